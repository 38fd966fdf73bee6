"""Every example in README.md and on every docs/*.md page is what the code produces today.

A console block is a fenced block marked ``console`` whose lines are commands (``$ ...``),
each followed by what it prints (stdout and stderr, as a terminal shows them). A python block
is a fenced block marked ``python``; when a ``text`` block follows it with nothing but blank
lines between, that is what it prints.

Each page runs on its own, in one bash (an ``export`` holds for the blocks after it), in a
folder laid out afresh for it as the pages assume: ``comfysync demo`` has run there (so
``data/demo.db`` and ``data/exports/demo`` exist), and ``COMFYCONTROL_BASE_URL`` points at a
simulated account on 127.0.0.1 that stands in for the user's own (it takes any token, so
``export COMFYCONTROL_TOKEN=...`` works as written). The console blocks run in page order,
then the python blocks. Commands run as a user types them after ``. .venv/bin/activate``:
``comfysync`` is this interpreter's ``-m pipeline.cli``, ``python`` this interpreter, and the
venv's ``bin`` is on ``PATH`` (datasette, sqlite-utils).

Outputs are compared exactly after normalising what differs from run to run: times, dates,
durations and sizes, loopback ports, the page's folder, and the redacted header digests
(their key is random per database). An output whose last line is ``...`` shows only the
first lines of what the command prints.

To refresh every page's outputs from the code (after changing an output, or merging):

    UPDATE_DOCS=1 .venv/bin/python -m pytest tests/test_docs_examples.py

which rewrites each block's outputs (commands and code are kept as written) and then checks
them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cli_environment, run_comfysync

from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: The account the syncing pages show: big enough for several pages, fixed by its seed.
ACCOUNT_RUNNERS = 1050
ACCOUNT_SEED = 7

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```$", re.DOTALL | re.MULTILINE)
_MARKER = "@@docs-example@@"
_NORMALISE = (
    # An instant, with or without fraction and offset, then a date alone.
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?"), "<time>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "<date>"),
    (re.compile(r"redacted:[0-9a-f]{12}"), "redacted:<hmac>"),
    (re.compile(r"\b(127\.0\.0\.1|localhost):\d+"), r"\1:<port>"),
    (re.compile(r"\b\d+(\.\d+)? (B|kB|MB|GB|TB)\b"), "<size>"),
    # Durations: "(N.N s)", "in N.N s" and the runs table's secs column (right-aligned, so
    # the spaces before it vary with its width too).
    # Not a part of an address (127.0.0.1) or a version.
    (re.compile(r" *(?<![\d.])\b\d+\.\d+\b(?!\.\d)"), " <n>"),
)


@dataclass(frozen=True)
class Example:
    """One command of a console block, or one python block, and the output the page shows.

    ``start``/``end`` locate the output in the page's text (for a python block without a
    ``text`` block after it, both are None: only its success is checked)."""

    kind: str
    command: str
    output: list[str]
    start: int | None
    end: int | None

    @property
    def truncated(self) -> bool:
        return bool(self.output) and self.output[-1] == "..."

    @property
    def label(self) -> str:
        first = self.command.strip().splitlines()[0]
        return first if self.kind == "console" else f"python: {first}"


def console_examples(body: str, start: int, end: int) -> list[Example]:
    """The commands of a console block's ``body``; a line before the first ``$ `` is an error."""
    commands: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            commands.append((line[2:], []))
        else:
            assert commands, f"console block output before any command: {line!r}"
            commands[-1][1].append(line)
    # Each command owns the block's span: rewriting one block means rewriting them all.
    return [Example("console", c, out, start, end) for c, out in commands]


def page_examples(text: str) -> list[Example]:
    """Every console command and python block of a page, in page order."""
    fences = list(_FENCE.finditer(text))
    examples = []
    for index, fence in enumerate(fences):
        info, body = fence.group(1), fence.group(2)
        if info == "console":
            examples += console_examples(body, fence.start(2), fence.end(2))
        elif info == "python":
            after = fences[index + 1] if index + 1 < len(fences) else None
            if after and after.group(1) == "text" and not text[fence.end() : after.start()].strip():
                output = after.group(2).splitlines()
                examples.append(Example("python", body, output, after.start(2), after.end(2)))
            else:
                examples.append(Example("python", body, [], None, None))
    return examples


def normalise(lines: list[str]) -> list[str]:
    """``lines`` with what differs from run to run replaced by placeholders."""
    result = []
    for line in lines:
        for pattern, placeholder in _NORMALISE:
            line = pattern.sub(placeholder, line)
        result.append(line)
    return result


def run_page(examples: list[Example], folder: Path, env: dict[str, str]) -> list[list[str]]:
    """Run a page's examples in ``folder``, console commands first, in one bash as a
    reader's shell would; what each printed, the folder's path replaced by ``<folder>``."""
    script = [
        "exec 2>&1",
        f'comfysync() {{ "{sys.executable}" -m pipeline.cli "$@"; }}',
        f'python() {{ "{sys.executable}" "$@"; }}',
    ]
    ordered = [e for e in examples if e.kind == "console"] + [
        e for e in examples if e.kind == "python"
    ]
    for example in ordered:
        script.append(f"echo {_MARKER}")
        if example.kind == "console":
            script.append(example.command)
        else:
            script += [
                "python - <<'@@END-OF-EXAMPLE@@' || echo \"@@python example failed: $?@@\"",
                example.command.rstrip("\n"),
                "@@END-OF-EXAMPLE@@",
            ]
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=300,
    )
    outputs: list[list[str]] = []
    for line in proc.stdout.replace(str(folder), "<folder>").splitlines():
        if line == _MARKER:
            outputs.append([])
        else:
            outputs[-1].append(line)
    assert len(outputs) == len(ordered), proc.stdout
    by_example = dict(zip(map(id, ordered), outputs, strict=True))
    return [by_example[id(example)] for example in examples]


def shown(example: Example, actual: list[str]) -> list[str]:
    """What the page should show for ``example``: all of ``actual``, or as many lines as the
    page shows now then ``...`` for a truncated one."""
    if example.truncated:
        return [*actual[: len(example.output) - 1], "..."]
    return actual


def update_page(text: str, examples: list[Example], actual: list[list[str]]) -> str:
    """``text`` with every example's shown output replaced by ``actual``."""
    spans: dict[tuple[int, int], list[str]] = {}
    for example, output in zip(examples, actual, strict=True):
        if example.start is None or example.end is None:
            continue
        body = spans.setdefault((example.start, example.end), [])
        if example.kind == "console":
            body.append(f"$ {example.command}")
        body += shown(example, output)
    for (start, end), body in sorted(spans.items(), reverse=True):
        text = text[:start] + "".join(line + "\n" for line in body) + text[end:]
    return text


def lay_out(folder: Path, demo: Path) -> None:
    """Empty ``folder`` but for a pristine copy of the demo's ``data`` folder ``demo``.

    Pages share one folder rather than copies of it, since the demo's database records the
    absolute paths of its snapshots (``status`` shows them)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    shutil.copytree(demo, folder / "data")


@pytest.fixture(scope="module")
def transcripts(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, list[tuple[Example, list[str]]]]:
    """Each page's examples with what they print now (every page run once, in turn)."""
    folder = tmp_path_factory.mktemp("reader")
    (folder / "data").mkdir()
    made = run_comfysync(folder, "demo")
    assert made.exit_code == 0, made.stderr
    demo = tmp_path_factory.mktemp("pristine") / "data"
    shutil.copytree(folder / "data", demo)
    account = SimulatedAccount(runners=ACCOUNT_RUNNERS, seed=ACCOUNT_SEED, token=None)
    venv_bin = str(Path(sys.executable).parent)
    actual = {}
    with LoopbackServer(account) as server:
        env = cli_environment(
            {
                "COMFYCONTROL_BASE_URL": server.url,
                "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "80",
            }
        )
        for page in PAGES:
            examples = page_examples(page.read_text())
            if examples:
                lay_out(folder, demo)
                actual[page] = run_page(examples, folder, env)
            else:
                actual[page] = []
    result = {}
    for page, outputs in actual.items():
        if os.environ.get("UPDATE_DOCS") == "1":
            page.write_text(update_page(page.read_text(), page_examples(page.read_text()), outputs))
        examples = page_examples(page.read_text())
        result[page.relative_to(REPO).as_posix()] = list(zip(examples, outputs, strict=True))
    return result


EXAMPLES = [
    (page.relative_to(REPO).as_posix(), index, example)
    for page in PAGES
    for index, example in enumerate(page_examples(page.read_text()))
]


def test_the_pages_show_the_commands_users_start_with():
    documented = {
        "README.md": ["export COMFYCONTROL_TOKEN=...", "comfysync sync"],
        "docs/index.md": ["comfysync demo"],
        "docs/syncing.md": ["export COMFYCONTROL_TOKEN=...", "comfysync sync"],
        "docs/history.md": [
            "comfysync status --db data/demo.db",
            "comfysync runs --db data/demo.db",
            "comfysync history 82283d15 --db data/demo.db",
            "comfysync changes --since 1h --db data/demo.db",
        ],
        "docs/scheduling.md": ["comfysync schedule --every 15m --max-runs 1"],
        "docs/exports.md": ["comfysync export -o fleet.parquet --db data/demo.db"],
    }
    for page, commands in documented.items():
        shown_commands = [
            example.command.split("#")[0].strip()
            for name, _, example in EXAMPLES
            if name == page and example.kind == "console"
        ]
        assert [c for c in shown_commands if c in commands] == commands, page


@pytest.mark.parametrize(
    ("page", "index"),
    [(page, index) for page, index, _ in EXAMPLES],
    ids=[f"{page}:{example.label}" for page, _, example in EXAMPLES],
)
def test_a_documented_example_prints_what_its_page_shows(transcripts, page, index):
    example, actual = transcripts[page][index]
    assert not any("@@python example failed" in line for line in actual), "\n".join(actual)
    if example.kind == "python" and example.start is None:
        return  # shown without its output: that it ran is what the page promises
    assert normalise(example.output) == normalise(shown(example, actual)), (
        f"{page} shows another output for `{example.label}`; if the code is right, refresh "
        "it: UPDATE_DOCS=1 .venv/bin/python -m pytest tests/test_docs_examples.py"
    )


def test_every_page_has_checked_examples():
    """A page of prose only would be fine, but these are the pages that promise examples."""
    checked = {page for page, _, _ in EXAMPLES}
    assert {
        "README.md",
        "docs/index.md",
        "docs/syncing.md",
        "docs/history.md",
        "docs/data-model.md",
        "docs/exports.md",
        "docs/analysis.md",
        "docs/scheduling.md",
        "docs/simulator.md",
    } <= checked


def test_no_other_fenced_block_holds_a_transcript():
    """A ``$ `` transcript outside a console block would never be run, so it would drift."""
    holding = [
        f"{page.relative_to(REPO)}: {fence.group(1) or 'no language'}"
        for page in PAGES
        for fence in _FENCE.finditer(page.read_text())
        if fence.group(2).startswith("$ ") and fence.group(1) != "console"
    ]
    assert holding == []


def test_a_page_is_parsed_into_its_commands_and_python_outputs():
    text = (
        "Intro\n\n```console\n$ comfysync runs\n  run\n$ echo hi\nhi\n```\n\n"
        "```python\nprint(1)\n```\n\n```text\n1\n```\n\n```python\nimport os\n```\n\n"
        "Prose.\n\n```text\nnot an output\n```\n"
    )
    examples = page_examples(text)
    assert [(e.kind, e.command, e.output) for e in examples] == [
        ("console", "comfysync runs", ["  run"]),
        ("console", "echo hi", ["hi"]),
        ("python", "print(1)\n", ["1"]),
        ("python", "import os\n", []),
    ]
    updated = update_page(text, examples, [["  run", "  1"], ["hi"], ["2"], []])
    assert "$ comfysync runs\n  run\n  1\n$ echo hi\nhi\n```" in updated
    assert "```text\n2\n```" in updated and "```text\nnot an output\n```" in updated


def test_normalising_keeps_what_matters():
    """Only the volatile parts become placeholders; counts, ids and names stay compared."""
    assert normalise(
        [
            "sync 1 success: 1050 runners in 11 pages (1 walk(s), complete) in 1.3 s",
            "    2  2026-11-28 19:34:50  success   12.2     250     1     2     1    0    0",
            'database:      data/demo.db (348.2 kB) {"Authorization":"redacted:e3b2dee32bce"}',
            "  snapshot: data/exports/csv/runners/snapshot_date=2026-11-28/runners-1.csv",
            "Simulated ComfyControl account: 250 runners at http://127.0.0.1:40143",
        ]
    ) == [
        "sync 1 success: 1050 runners in 11 pages (1 walk(s), complete) in <n> s",
        "    2  <time>  success <n>     250     1     2     1    0    0",
        'database:      data/demo.db (<size>) {"Authorization":"redacted:<hmac>"}',
        "  snapshot: data/exports/csv/runners/snapshot_date=<date>/runners-1.csv",
        "Simulated ComfyControl account: 250 runners at http://127.0.0.1:<port>",
    ]
