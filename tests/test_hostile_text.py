"""Upstream text never drives the terminal: every human output shows control characters
escaped, and keeps its own lines; ``--json`` carries the exact text.

Hostile strings go where upstream puts text (runner ids, names, tags, endpoint, status,
header names, the owner's user_id), are synced for real, and every human command runs as a
process. Each output is compared with that of a "twin" mirror, built the same way from the
hostile strings as they should be shown with every backslash made plain: a plain text of the
same shape, so both outputs must have the same lines. The table covers each kind of control
end to end; hypothesis then drives any text through every report and log formatter in process.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from conftest import CliResult, Upstream, cli_environment
from hypothesis import given
from hypothesis import strategies as st

from jobs.log_format import JsonFormatter, TextFormatter
from pipeline.read.changelog import FieldChange, RunnerHistory, VersionEntry
from pipeline.read.overview import DamagedSnapshot, FailedSnapshot, MirrorStatus, Snapshots, SyncRun
from pipeline.read.report import describe_changes, describe_history, describe_runs, describe_status
from pipeline.settings import Settings
from pipeline.sync.run import run_sync

TOKEN = {"COMFYCONTROL_TOKEN": "test-token"}

#: What must never reach a terminal raw: C0 controls, DEL, C1 controls, the Unicode line and
#: paragraph separators and the bidi embeddings, overrides and isolates.
DANGEROUS = frozenset(
    chr(code)
    for code in (
        *range(0x00, 0x20),
        *range(0x7F, 0xA0),
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    )
)


def shown(text: str) -> str:
    """The oracle: ``text`` as it must be shown, each dangerous character and the backslash as
    JSON escapes it (``\\u001b``, ``\\n``, ``\\u2028``, ``\\\\``), everything else as it is."""
    return "".join(
        json.dumps(char)[1:-1] if char in DANGEROUS or char == "\\" else char for char in text
    )


def twin(text: str) -> str:
    """A plain string shown exactly as long as ``text`` is shown, with the same spaces."""
    return shown(text).replace("\\", "_")


def argv_safe(text: str) -> str:
    """``text`` without NUL, which no command line can carry (used where a test types a value)."""
    return text.replace("\x00", "")


def raw_output_problems(text: str) -> set[str]:
    """The dangerous characters in an output, but its own line breaks."""
    return set(text) & (DANGEROUS - {"\n"})


def run_raw(folder: Path, *args: str) -> CliResult:
    """A command's exit code and output, decoded without newline translation (text mode would
    turn a raw ``\\r`` into ``\\n`` and hide it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=folder,
        env=cli_environment({**TOKEN, "PYTHONIOENCODING": "utf-8"}),
        capture_output=True,
        timeout=120,
    )
    return CliResult(proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8"))


HOSTILE = {
    "C0 controls": "".join(chr(code) for code in range(0x20)),
    "DEL and C1 controls": "".join(chr(code) for code in range(0x7F, 0xA0)),
    "ESC sequences and a forged line": (
        "\x1b[2J\x1b[H\x1b[1;31mred\x1b]0;title\x07\x1bc"
        "\r\n2026-11-28 19:34:51 UTC  deleted   deadbeef  v9   forged-line\r"
    ),
    "separators and bidi overrides": "".join(
        chr(code) for code in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    )
    + "evil",
}


@dataclass
class Scenario:
    """What the scenario typed and what each command printed."""

    folder: Path
    text: str
    created_id: str
    solo_name: str
    solo_status: str
    dup_name: str
    outputs: dict[str, CliResult]


def play(folder: Path, text: str, typed: str, serve_account, *, with_json: bool) -> Scenario:
    """Mirror an account whose texts carry ``text`` (``typed`` where a command line names the
    runner), change it upstream, sync again, meet a foreign account, then run every human
    command (and, ``with_json``, their --json forms)."""
    folder.mkdir()
    db = folder / "m.db"
    upstream: Upstream = serve_account(runners=4, seed=7, user_id=f"owner-{text}")
    account = upstream.account
    settings = Settings(
        base_url=upstream.url, token="test-token", db_path=db, export_dir=None, max_retries=0
    )
    run_sync(settings)
    ids = account.runner_ids()
    created = account.create_runner(
        id=f"id-{typed}",
        name=f"dup-{typed}",
        tags=[f"tag-{text}"],
        endpoint=f"https://runner.example/{text}",
        status=f"st-{text}",
        headers={f"H-{text}": "secret"},
    )
    account.rename_runner(ids[1], f"dup-{typed}")
    solo_status = account.get_runner(ids[2])["status"]
    account.update_runner(
        ids[2],
        name=f"solo-{typed}",
        tags=[text],
        endpoint=f"https://solo.example/{text}",
        status=text,
        headers={text: "secret"},
    )
    account.delete_runner(ids[3])
    foreign = serve_account(runners=2, seed=8, user_id=f"other-{text}")

    def cli(*args: str) -> CliResult:
        return run_raw(folder, *args)

    where = ("--db", str(db))
    once = ("schedule", "--base-url", foreign.url, *where, "--no-export", "--every", "1h")
    once += ("--max-runs", "1")
    outputs = {
        "sync": cli("sync", "--base-url", upstream.url, *where, "--no-export"),
        "sync of a foreign account": cli("sync", "--base-url", foreign.url, *where, "--no-export"),
        "schedule": cli(*once),
        "status": cli("status", *where, "--export-dir", str(folder / "exports")),
        "runs": cli("runs", *where),
        "history by id": cli("history", created["id"], *where),
        "history by name": cli("history", f"solo-{typed}", *where),
        "history by an ambiguous name": cli("history", f"dup-{typed}", *where),
        "changes": cli("changes", "--since", "30d", *where),
    }
    if with_json:
        outputs |= {
            "schedule --log-format json": cli(*once, "--log-format", "json"),
            "status --json": cli("status", *where, "--json"),
            "runs --json": cli("runs", *where, "--json"),
            "history by id --json": cli("history", created["id"], *where, "--json"),
            "history by name --json": cli("history", f"solo-{typed}", *where, "--json"),
            "changes --json": cli("changes", "--since", "30d", *where, "--json"),
        }
    return Scenario(
        folder, text, created["id"], f"solo-{typed}", solo_status, f"dup-{typed}", outputs
    )


@pytest.mark.parametrize("kind", HOSTILE)
def test_every_human_output_escapes_upstream_controls_and_keeps_its_lines(
    kind, serve_account, tmp_path
):
    text = HOSTILE[kind]
    typed = argv_safe(text)
    hostile = play(tmp_path / "hostile", text, typed, serve_account, with_json=True)
    plain = play(tmp_path / "twin", twin(text), twin(typed), serve_account, with_json=False)
    out = hostile.outputs

    expected_codes = {"sync of a foreign account": 2, "history by an ambiguous name": 2}
    for command, result in out.items():
        assert result.exit_code == expected_codes.get(command, 0), (command, result.stderr)
        for stream in (result.stdout, result.stderr):
            assert raw_output_problems(stream) == set(), (command, stream)
    for command, result in plain.outputs.items():
        hostile_result = out[command]
        assert result.exit_code == hostile_result.exit_code, (command, result.stderr)
        pairs = ((hostile_result.stdout, result.stdout), (hostile_result.stderr, result.stderr))
        for mine, theirs in pairs:
            assert mine.count("\n") == theirs.count("\n"), (command, mine, theirs)

    # The values are there, visibly escaped.
    assert f"  {shown(hostile.solo_name)}  (present)" in out["history by name"].stdout
    status_change = f'status: "{hostile.solo_status}"(\n *)? -> "{re.escape(shown(text))}"\n'
    assert re.search(status_change, out["history by name"].stdout)
    assert f'-> ["{shown(text)}"]' in out["history by name"].stdout
    assert f"other-{shown(text)}" in out["sync of a foreign account"].stderr
    assert out["sync of a foreign account"].stderr.count("\n") == 1
    assert out["history by an ambiguous name"].stderr.startswith("comfysync: error: ")
    assert out["history by an ambiguous name"].stderr.count("\n") == 1
    assert out["history by an ambiguous name"].stderr.count(shown(hostile.dup_name)) == 3
    schedule_failures = [
        line for line in out["schedule"].stderr.splitlines() if "run failed:" in line
    ]
    assert len(schedule_failures) == 1 and f"other-{shown(text)}" in schedule_failures[0]

    # --json stays exact.
    by_id = json.loads(out["history by id --json"].stdout)
    assert (by_id["runner_id"], by_id["name"]) == (hostile.created_id, hostile.dup_name)
    by_name = json.loads(out["history by name --json"].stdout)
    fields = {f["field"]: f["new_value"] for f in by_name["versions"][-1]["fields"]}
    assert fields["name"] == hostile.solo_name
    assert fields["status"] == text
    assert fields["endpoint"] == f"https://solo.example/{text}"
    assert json.loads(fields["tags"]) == [text]
    assert list(json.loads(fields["headers"])) == [text]
    changed = json.loads(out["changes --json"].stdout)["changes"]
    assert {hostile.solo_name, hostile.dup_name} <= {change["name"] for change in changed}
    [foreign_run, *_] = json.loads(out["runs --json"].stdout)
    assert f"other-{text}" in foreign_run["error"] and f"owner-{text}" in foreign_run["error"]
    status = json.loads(out["status --json"].stdout)
    assert f"other-{text}" in status["last_sync"]["error"]
    logged = [json.loads(line) for line in out["schedule --log-format json"].stderr.splitlines()]
    assert any(f"other-{text}" in entry["message"] for entry in logged)


def test_debug_shows_the_traceback_escaped_too(serve_account, tmp_path):
    text = HOSTILE["ESC sequences and a forged line"]
    db = tmp_path / "m.db"
    upstream = serve_account(runners=2, seed=7, user_id="owner")
    run_sync(Settings(base_url=upstream.url, token="test-token", db_path=db, export_dir=None))
    foreign = serve_account(runners=2, seed=8, user_id=f"other-{text}")
    result = run_raw(tmp_path, "sync", "--debug", "--base-url", foreign.url, "--db", str(db))
    assert result.exit_code == 2, result.stderr
    assert "Traceback (most recent call last):" in result.stderr
    assert raw_output_problems(result.stderr) == set()
    assert (
        f"comfysync: error: the API listed runners of owner other-{shown(text)}, " in result.stderr
    )
    first_line = text.split("\n")[0]  # in the traceback, the exception's own newline stays
    assert result.stderr.count(f"other-{shown(first_line)}") == 2


def test_a_text_that_looks_like_an_escape_is_shown_apart_from_the_control_itself(
    serve_account, tmp_path
):
    """Distinct names stay distinct on screen: a literal backslash-n is not a newline."""
    upstream = serve_account(runners=2, seed=9)
    ids = upstream.account.runner_ids()
    upstream.account.rename_runner(ids[0], "a\nb")
    upstream.account.rename_runner(ids[1], "a\\nb")
    db = tmp_path / "m.db"
    run_sync(Settings(base_url=upstream.url, token="test-token", db_path=db, export_dir=None))
    control = run_raw(tmp_path, "history", ids[0], "--db", str(db))
    lookalike = run_raw(tmp_path, "history", ids[1], "--db", str(db))
    assert control.stdout.splitlines()[0] == f"{ids[0]}  a\\nb  (present)"
    assert lookalike.stdout.splitlines()[0] == f"{ids[1]}  a\\\\nb  (present)"


def test_local_paths_with_controls_are_printed_escaped(serve_account, tmp_path):
    """Not upstream text, but printed the same way: sync's summary, status, export's line."""
    upstream = serve_account(runners=2, seed=9)
    folder = "snap\x1b[2J\rforged"
    db = "m\x1b]0;t\x07.db"
    sync = run_raw(tmp_path, "sync", "--base-url", upstream.url, "--db", db, "--export-dir", folder)
    status = run_raw(tmp_path, "status", "--db", db, "--export-dir", folder)
    name = "out\x1b[2J\rforged.csv"
    export = run_raw(tmp_path, "export", "-o", name, "--db", db)
    for result in (sync, status, export):
        assert result.exit_code == 0, result.stderr
        assert raw_output_problems(result.stdout + result.stderr) == set(), result.stdout
    assert f"  database: {shown(db)}\n" in sync.stdout
    assert sync.stdout.count(f"  snapshot: {shown(folder)}/") == 2
    assert status.stdout.startswith(f"database:      {shown(db)} (")
    assert (tmp_path / name).is_file()
    assert export.stdout.startswith(f"2 rows written to {shown(name)} (")
    assert export.stdout.count("\n") == 1


# -- the class, in process: every report and log line, for any hostile text ----------------

#: Texts mixing the dangerous characters with the backslash, quotes, spaces and any others.
hostile_texts = st.text(
    st.one_of(
        st.sampled_from(sorted(DANGEROUS | {"\\", '"', "'", " "})),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=40,
)


def a_run(run_id: int, error: str | None, warnings: tuple[str, ...]) -> SyncRun:
    counts = dict.fromkeys(
        ("pages", "walks", "total_reported", "runners_seen", "created", "updated", "deleted",
         "restored", "unchanged", "rejected"),
        1,
    )  # fmt: skip
    return SyncRun(
        id=run_id,
        started_at="2026-11-28T19:05:12.123456Z",
        finished_at="2026-11-28T19:05:13.123456Z",
        seconds=1.0,
        status="failed" if error else "partial",
        base_url="http://127.0.0.1:1",
        complete=True,
        warnings=warnings,
        error=error,
        **counts,  # type: ignore[arg-type]
    )


def reports(texts: list[str]) -> dict[str, str]:
    """Every text report, with upstream-derived values (and local ones) taken from ``texts``."""
    name, old, tag, header, error = texts
    fields = (
        FieldChange("name", old, name),
        FieldChange("status", "active", tag),
        FieldChange("tags", orjson.dumps([old]).decode(), orjson.dumps([tag, name]).decode()),
        FieldChange("headers", "{}", orjson.dumps({header: "redacted:0123456789ab"}).decode()),
    )
    entry = VersionEntry(
        runner_id=header, name=name, version=2, change="updated",
        changed_at="2026-11-28T19:05:12.123456Z", sync_id=2, fields=fields,
    )  # fmt: skip
    history = RunnerHistory(runner_id=header, name=name, deleted_at=None, versions=(entry,))
    runs = [a_run(2, error, ()), a_run(1, None, (error, f"{tag} {name}"))]
    snapshots = Snapshots(
        export_dir=old,
        files=2,
        oldest=tag,
        newest=name,
        damaged=(DamagedSnapshot(path=header, sync_id=1, bytes=1, written_bytes=2),),
        not_written=(FailedSnapshot(sync_id=2, format="csv", error=error),),
    )
    status = MirrorStatus(
        db_path=name, size_bytes=1, schema_version=1, last_sync=runs[0],
        last_success=runs[1], runners_present=1, runners_deleted=0, versions=2,
        snapshots=snapshots,
    )  # fmt: skip
    return {
        "history": describe_history(history),
        "changes": describe_changes([entry], "2026-11-28T00:00:00Z"),
        "runs": describe_runs(runs),
        "status": describe_status(status),
    }


@given(st.lists(hostile_texts, min_size=5, max_size=5))
def test_every_report_escapes_any_text_and_keeps_the_lines_of_a_plain_one(texts):
    hostile = reports(texts)
    plain = reports([twin(text) for text in texts])
    for report, text in hostile.items():
        assert raw_output_problems(text) == set(), report
        assert text.count("\n") == plain[report].count("\n"), (report, text, plain[report])


@given(hostile_texts)
def test_the_schedule_text_log_line_escapes_any_text(text):
    record = logging.LogRecord("jobs.sync_runners", logging.ERROR, __file__, 1,
                               "run failed: %s", (text,), None)  # fmt: skip
    line = TextFormatter().format(record)
    assert raw_output_problems(line + "\n") == set()
    assert line.endswith(f"comfysync: ERROR: run failed: {shown(text)}")


@given(hostile_texts)
def test_the_schedule_json_log_line_stays_exact_json_without_raw_controls(text):
    record = logging.LogRecord("jobs.sync_runners", logging.ERROR, __file__, 1,
                               "run failed: %s", (text,), None)  # fmt: skip
    line = JsonFormatter().format(record)
    assert raw_output_problems(line + "\n") == set()
    assert json.loads(line)["message"] == f"run failed: {text}"


def test_a_warning_logged_during_a_command_is_one_escaped_line(tmp_path):
    """The CLI's own log sink (``comfysync: WARNING: ...``), whatever logs through it."""
    text = "".join(sorted(DANGEROUS))
    script = (
        "import logging, sys\n"
        "from pipeline.cli import cli, main\n"
        "@cli.command('emit')\n"
        "def emit():\n"
        "    logging.getLogger('pipeline.sync.run').warning('upstream said: %s', sys.argv[1])\n"
        "main(['emit'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, argv_safe(text)],
        cwd=tmp_path,
        env=cli_environment({"PYTHONIOENCODING": "utf-8"}),
        capture_output=True,
        timeout=60,
    )
    stderr = proc.stderr.decode("utf-8")
    assert proc.returncode == 0, stderr
    assert stderr == f"comfysync: WARNING: upstream said: {shown(argv_safe(text))}\n"
