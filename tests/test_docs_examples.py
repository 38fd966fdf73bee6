"""Every ```console block in README.md is a transcript the code produces today.

A console block is a fenced block marked ``console`` whose lines are commands (``$ ...``),
each followed by what it prints (stdout and stderr, as a terminal shows them). The blocks
run in README order, in one bash and one folder laid out as the README assumes: the README's
first line has run (``comfysync demo``, so ``data/demo.db`` exists), and
``COMFYCONTROL_BASE_URL`` points at a simulated account on 127.0.0.1 that stands in for the
user's own (it takes any token, so ``export COMFYCONTROL_TOKEN=...`` works as written, and
holds for the blocks after it). The commands run as a user types them after
``. .venv/bin/activate``: ``comfysync`` is this interpreter's ``-m pipeline.cli``, ``python``
this interpreter, and the venv's ``bin`` is on ``PATH`` (datasette, sqlite-utils).

Outputs are compared exactly after normalising what differs from run to run: times, dates,
durations and sizes, and the redacted header digests (their key is random per database). An
output whose last line is ``...`` shows only the first lines of what the command prints.

To refresh the README's outputs from the code (after changing an output, or merging):

    UPDATE_README=1 .venv/bin/python -m pytest tests/test_readme_examples.py

which rewrites each block's outputs (the commands are kept as written) and then checks them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cli_environment, run_comfysync

from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

README_PATH = REPO / "README.md"
#: The account `Sync your account` shows: big enough for several pages, fixed by its seed.
ACCOUNT_RUNNERS = 1050
ACCOUNT_SEED = 7

_BLOCK = re.compile(r"^```console\n(.*?)^```$", re.DOTALL | re.MULTILINE)
_MARKER = "@@readme-example-command@@"
_NORMALISE = (
    # An instant, with or without fraction and offset, then a date alone.
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?"), "<time>"),
    (re.compile(r"\d{4}-\d{2}-\d{2}"), "<date>"),
    (re.compile(r"redacted:[0-9a-f]{12}"), "redacted:<hmac>"),
    (re.compile(r"\b\d+(\.\d+)? (B|kB|MB|GB|TB)\b"), "<size>"),
    # Durations: "(0.2 s)", "in 1.3 s" and the runs table's secs column (right-aligned, so
    # the spaces before it vary with its width too).
    (re.compile(r" *\b\d+\.\d+\b"), " <n>"),
)


@dataclass(frozen=True)
class Example:
    """One ``$ command`` of a console block and the output the README shows for it."""

    command: str
    output: list[str]

    @property
    def truncated(self) -> bool:
        return bool(self.output) and self.output[-1] == "..."


@dataclass(frozen=True)
class Block:
    """A console block: where its body sits in README.md, and its commands in order."""

    start: int
    end: int
    examples: tuple[Example, ...]


def console_blocks(text: str) -> list[Block]:
    """Every ```console block of ``text``; a body line before the first ``$ `` is an error."""
    blocks = []
    for match in _BLOCK.finditer(text):
        examples: list[Example] = []
        for line in match.group(1).splitlines():
            if line.startswith("$ "):
                examples.append(Example(line[2:], []))
            else:
                assert examples, f"console block output before any command: {line!r}"
                examples[-1].output.append(line)
        blocks.append(Block(match.start(1), match.end(1), tuple(examples)))
    return blocks


def normalise(lines: list[str]) -> list[str]:
    """``lines`` with what differs from run to run replaced by placeholders."""
    result = []
    for line in lines:
        for pattern, placeholder in _NORMALISE:
            line = pattern.sub(placeholder, line)
        result.append(line)
    return result


def run_blocks(blocks: list[Block], folder: Path, env: dict[str, str]) -> list[list[list[str]]]:
    """Run every block's commands in ``folder``, in one bash as a reader's shell would (an
    ``export`` holds for the blocks after it); each block's outputs, one list per command."""
    script = [
        "exec 2>&1",
        f'comfysync() {{ "{sys.executable}" -m pipeline.cli "$@"; }}',
        f'python() {{ "{sys.executable}" "$@"; }}',
    ]
    for block in blocks:
        for example in block.examples:
            script += [f"echo {_MARKER}", example.command]
    proc = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    outputs: list[list[str]] = []
    for line in proc.stdout.splitlines():
        if line == _MARKER:
            outputs.append([])
        else:
            outputs[-1].append(line)
    assert len(outputs) == sum(len(block.examples) for block in blocks), proc.stdout
    by_block = []
    for block in blocks:
        by_block.append(outputs[: len(block.examples)])
        outputs = outputs[len(block.examples) :]
    return by_block


def shown(example: Example, actual: list[str]) -> list[str]:
    """What the README should show for ``example``: all of ``actual``, or as many lines as
    the README shows now then ``...`` for a truncated one."""
    if example.truncated:
        return [*actual[: len(example.output) - 1], "..."]
    return actual


def update_readme(text: str, blocks: list[Block], actual: list[list[list[str]]]) -> str:
    """``text`` with every console block's outputs replaced by ``actual``."""
    for block, outputs in reversed(list(zip(blocks, actual, strict=True))):
        body = []
        for example, output in zip(block.examples, outputs, strict=True):
            body += [f"$ {example.command}", *shown(example, output)]
        text = text[: block.start] + "\n".join(body) + "\n" + text[block.end :]
    return text


@pytest.fixture(scope="module")
def transcripts(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Block, list[list[str]]]]:
    """Each README console block with what its commands print now (run once, in order)."""
    folder = tmp_path_factory.mktemp("newcomer")
    (folder / "data").mkdir()
    demo = run_comfysync(folder, "demo")
    assert demo.exit_code == 0, demo.stderr
    account = SimulatedAccount(runners=ACCOUNT_RUNNERS, seed=ACCOUNT_SEED, token=None)
    venv_bin = str(Path(sys.executable).parent)
    with LoopbackServer(account) as server:
        env = cli_environment(
            {
                "COMFYCONTROL_BASE_URL": server.url,
                "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "80",
            }
        )
        text = README_PATH.read_text()
        blocks = console_blocks(text)
        actual = run_blocks(blocks, folder, env)
    if os.environ.get("UPDATE_README") == "1":
        README_PATH.write_text(update_readme(text, blocks, actual))
        blocks = console_blocks(README_PATH.read_text())
    return list(zip(blocks, actual, strict=True))


def commands_of(text: str) -> list[str]:
    """Every ``$ `` command of the console blocks of ``text``, in order, comments left out."""
    return [e.command.split("#")[0].strip() for b in console_blocks(text) for e in b.examples]


COMMANDS = commands_of(README_PATH.read_text())


def test_the_readme_shows_the_outputs_of_the_documented_commands():
    documented = [
        "export COMFYCONTROL_TOKEN=...",
        "comfysync sync",
        "comfysync status --db data/demo.db",
        "comfysync runs --db data/demo.db",
        "comfysync history 82283d15 --db data/demo.db",
        "comfysync changes --since 1h --db data/demo.db",
        "comfysync schedule --every 15m --max-runs 1",
        "comfysync export -o fleet.parquet",
    ]
    assert [command for command in COMMANDS if command in documented] == documented


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=COMMANDS)
def test_a_readme_example_prints_what_the_readme_shows(transcripts, index):
    examples = [
        (example, output)
        for block, outputs in transcripts
        for example, output in zip(block.examples, outputs, strict=True)
    ]
    example, actual = examples[index]
    assert normalise(example.output) == normalise(shown(example, actual)), (
        f"README shows another output for `{example.command}`; if the code is right, "
        "refresh it: UPDATE_README=1 .venv/bin/python -m pytest tests/test_readme_examples.py"
    )


def test_no_other_fenced_block_holds_a_transcript():
    """A ``$ `` transcript outside a console block would never be run, so it would drift."""
    text = README_PATH.read_text()
    fences = re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)
    assert [info for info, body in fences if body.startswith("$ ") and info != "console"] == []


def test_the_readme_says_how_to_put_the_commands_on_path_right_after_the_first_lines():
    text = README_PATH.read_text()
    opening = text[: text.index("\n## ")]
    assert "run `. .venv/bin/activate` in your shell" in opening


def test_normalising_keeps_what_matters():
    """Only the volatile parts become placeholders; counts, ids and names stay compared."""
    assert normalise(
        [
            "sync 1 success: 1050 runners in 11 pages (1 walk(s), complete) in 1.3 s",
            "    2  2026-11-28 19:34:50  success   12.2     250     1     2     1    0    0",
            'database:      data/demo.db (348.2 kB) {"Authorization":"redacted:e3b2dee32bce"}',
            "  snapshot: data/exports/csv/runners/snapshot_date=2026-11-28/runners-1.csv",
        ]
    ) == [
        "sync 1 success: 1050 runners in 11 pages (1 walk(s), complete) in <n> s",
        "    2  <time>  success <n>     250     1     2     1    0    0",
        'database:      data/demo.db (<size>) {"Authorization":"redacted:<hmac>"}',
        "  snapshot: data/exports/csv/runners/snapshot_date=<date>/runners-1.csv",
    ]
