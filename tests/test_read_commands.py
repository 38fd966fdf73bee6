"""`status`, `runs`, `history` and `changes` against a mirror with known history, as processes.

Outputs are asserted whole. The only values not fixed in advance are the wall-clock times and
durations of the syncs (and the simulator's port in base_url): they are read back from the
database and substituted, never masked.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import rows, run_comfysync
from mirror_fixture import Mirror

from pipeline.errors import ConfigurationError
from pipeline.read.changelog import parse_since
from pipeline.store.schema import SCHEMA_VERSION, open_store

NO_DB = (
    "comfysync: error: no database at absent.db; create one with `comfysync sync` "
    "(or try `comfysync demo`)\n"
)


def shown(timestamp: str) -> str:
    """A stored time as the text outputs show it."""
    return timestamp[:19].replace("T", " ")


def seconds(mirror: Mirror, sync_id: int) -> float:
    started, finished = (datetime.fromisoformat(t) for t in mirror.runs[sync_id])
    return round((finished - started).total_seconds(), 3)


def base_url(mirror: Mirror) -> str:
    return str(rows(mirror.path, "SELECT base_url FROM sync_runs WHERE id = 1")[0][0])


def run_json(mirror: Mirror, run_id: int) -> dict[str, object]:
    """The --json form of a run-log row, from the scenario's known counts."""
    started, finished = mirror.runs[run_id]
    counts: dict[int, dict[str, object]] = {
        1: dict(complete=True, pages=1, walks=1, total_reported=12, runners_seen=12,
                created=12, updated=0, deleted=0, restored=0, unchanged=0, rejected=0),
        # Sync 2 deletes a runner: one page of walk, one re-read proving it gone (pipeline.source.walk).
        2: dict(complete=True, pages=2, walks=1, total_reported=12, runners_seen=12,
                created=1, updated=2, deleted=1, restored=0, unchanged=9, rejected=0),
        3: dict(complete=None, pages=None, walks=None, total_reported=None, runners_seen=None,
                created=None, updated=None, deleted=None, restored=None, unchanged=None,
                rejected=None),
    }  # fmt: skip
    return {
        "id": run_id,
        "started_at": started,
        "finished_at": finished,
        "seconds": seconds(mirror, run_id),
        "status": "failed" if run_id == 3 else "success",
        "base_url": base_url(mirror),
        **counts[run_id],
        "warnings": [],
        "error": FAILURE if run_id == 3 else None,
    }


FAILURE = (
    "ComfyControl failed on page 1 after 1 attempts (HTTP 503); nothing was applied, "
    "try again later"
)


# -- status ---------------------------------------------------------------------------------


def test_status_reports_the_last_sync_the_counts_and_no_snapshots(mirror: Mirror, run_cli):
    result = run_cli("status", "--db", str(mirror.path))
    assert (result.exit_code, result.stderr) == (0, "")
    size = mirror.path.stat().st_size
    assert 1000 <= size < 1_000_000
    assert result.stdout == (
        f"database:      {mirror.path} ({size / 1000:.1f} kB)\n"
        f"schema:        version {SCHEMA_VERSION}\n"
        f"last sync:     #3 failed, {shown(mirror.runs[3][0])} UTC ({seconds(mirror, 3):.1f} s)\n"
        "               error: ComfyControl failed on page 1 after 1 attempts (HTTP 503);\n"
        "                 nothing was applied, try again later\n"
        f"last success:  #2, {shown(mirror.runs[2][0])} UTC\n"
        "runners:       12 present, 1 deleted\n"
        "versions:      16 recorded\n"
        "snapshots:     none under data/exports\n"
    )


def test_status_json(mirror: Mirror, run_cli):
    result = run_cli("status", "--json", env={"COMFYSYNC_DB": str(mirror.path)})
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "db_path": str(mirror.path),
        "size_bytes": mirror.path.stat().st_size,
        "schema_version": SCHEMA_VERSION,
        "last_sync": run_json(mirror, 3),
        "last_success": run_json(mirror, 2),
        "runners_present": 12,
        "runners_deleted": 1,
        "versions": 16,
        "snapshots": {
            "export_dir": "data/exports",
            "files": 0,
            "oldest": None,
            "newest": None,
            "damaged": [],
            "not_written": [],
            "latest": [],
        },
        "database_id": None,
    }


def test_status_finds_the_oldest_and_newest_snapshot_files(mirror: Mirror, run_cli, tmp_path):
    snapshots = [
        "parquet/runners/snapshot_date=2026-11-27/runners-1.parquet",
        "csv/runners/snapshot_date=2026-11-27/runners-1.csv",
        "csv/runners/snapshot_date=2026-11-28/runners-2.csv",
        "parquet/runners/snapshot_date=2026-11-28/runners-2.parquet",
        "parquet/runners/snapshot_date=2026-11-28/runners-10.parquet",
    ]
    not_snapshots = [
        "parquet/runners/snapshot_date=2026-11-29/runners-11.parquet.tmp",
        "parquet/runners/snapshot_date=someday/runners-12.parquet",
        "parquet/runners/snapshot_date=2026-11-30/notes.txt",
        "parquet/other/snapshot_date=2026-11-30/runners-13.parquet",
    ]
    for name in snapshots + not_snapshots:
        (tmp_path / "exports" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "exports" / name).write_bytes(b"x")
    result = run_cli("status", "--db", str(mirror.path), env={"COMFYSYNC_EXPORT_DIR": "exports"})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == [
        "snapshots:     5 file(s) under exports",
        "               oldest exports/csv/runners/snapshot_date=2026-11-27/runners-1.csv",
        "               newest exports/parquet/runners/snapshot_date=2026-11-28/runners-10.parquet",
    ]
    as_json = run_cli("status", "--json", "--db", str(mirror.path), "--export-dir", "exports")
    assert json.loads(as_json.stdout)["snapshots"] == {
        "export_dir": "exports",
        "files": 5,
        "oldest": "exports/csv/runners/snapshot_date=2026-11-27/runners-1.csv",
        "newest": "exports/parquet/runners/snapshot_date=2026-11-28/runners-10.parquet",
        "damaged": [],
        "not_written": [],
        "latest": [],
    }


def test_status_counts_exactly_the_files_the_snapshot_layout_holds(
    mirror: Mirror, run_cli, tmp_path
):
    """status lists what the writer writes and --keep-snapshots prunes, nothing more."""
    from pipeline.outputs.snapshot import snapshot_files

    day = "parquet/runners/snapshot_date=2026-11-28"
    for name in (
        f"{day}/runners-2.parquet",
        "csv/runners/snapshot_date=2026-11-28/runners-2.csv",
        "json/runners/snapshot_date=2026-11-28/runners-3.json",  # a format never written
        "csv/runners/snapshot_date=2026-11-28/runners-4.parquet",  # in another format's tree
        f"{day}/runners-5.parquet.bak",
        f"{day}/runners-6.csv",
        f"{day}/runners-7.PARQUET",
    ):
        (tmp_path / "exports" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "exports" / name).write_bytes(b"x")
    layout = sorted(
        str(path.relative_to(tmp_path))
        for fmt in ("parquet", "csv")
        for _, path in snapshot_files(tmp_path / "exports", fmt)
    )
    assert layout == [
        "exports/csv/runners/snapshot_date=2026-11-28/runners-2.csv",
        "exports/parquet/runners/snapshot_date=2026-11-28/runners-2.parquet",
    ]
    result = run_cli("status", "--json", "--db", str(mirror.path), "--export-dir", "exports")
    assert result.exit_code == 0, result.stderr
    snapshots = json.loads(result.stdout)["snapshots"]
    assert (snapshots["files"], snapshots["oldest"], snapshots["newest"]) == (2, *layout)


def snapshot_lines(stdout: str) -> list[str]:
    """The snapshot lines of `status`, with the snapshot dates (today's) as D."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("snapshots:"))
    return [re.sub(r"snapshot_date=[0-9-]+", "snapshot_date=D", line) for line in lines[start:]]


def test_status_lists_the_snapshots_its_own_syncs_wrote(run_cli, tmp_path):
    """The demo writes under data/exports/demo; another mirror's files in data/exports are not its own."""
    assert run_cli("demo").exit_code == 0
    stray = tmp_path / "data/exports/parquet/runners/snapshot_date=2026-11-01/runners-9.parquet"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"another database's snapshot")
    result = run_cli("status", "--db", "data/demo.db")
    assert (result.exit_code, result.stderr) == (0, "")
    assert snapshot_lines(result.stdout) == [
        "snapshots:     4 file(s) under data/exports/demo",
        "               oldest data/exports/demo/csv/runners/snapshot_date=D/runners-1.csv",
        "               newest data/exports/demo/parquet/runners/snapshot_date=D/runners-2.parquet",
    ]
    as_json = json.loads(run_cli("status", "--json", "--db", "data/demo.db").stdout)
    assert (as_json["snapshots"]["export_dir"], as_json["snapshots"]["files"]) == (
        "data/exports/demo",
        4,
    )


def test_status_finds_the_export_dir_its_syncs_used_from_anywhere(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=5, seed=2)
    sync = run_cli(
        "sync", "--base-url", upstream.url, "--token", "test-token", "--db", "m.db",
        "--export-dir", "snaps/here", "--format", "csv",
    )  # fmt: skip
    assert sync.exit_code == 0, sync.stderr
    here = run_cli("status", "--db", "m.db")
    assert snapshot_lines(here.stdout) == [
        "snapshots:     1 file(s) under snaps/here",
        "               oldest snaps/here/csv/runners/snapshot_date=D/runners-1.csv",
        "               newest snaps/here/csv/runners/snapshot_date=D/runners-1.csv",
    ]
    # From another folder the recorded folder is named in full, as it is not below the cwd.
    (tmp_path / "elsewhere").mkdir()
    away = run_comfysync(tmp_path / "elsewhere", "status", "--db", str(tmp_path / "m.db"))
    folder = tmp_path / "snaps" / "here"
    assert snapshot_lines(away.stdout) == [
        f"snapshots:     1 file(s) under {folder}",
        f"               oldest {folder}/csv/runners/snapshot_date=D/runners-1.csv",
        f"               newest {folder}/csv/runners/snapshot_date=D/runners-1.csv",
    ]
    # An --export-dir (or COMFYSYNC_EXPORT_DIR) that is given is where status looks.
    for given in (
        run_cli("status", "--db", "m.db", "--export-dir", "other"),
        run_cli("status", "--db", "m.db", env={"COMFYSYNC_EXPORT_DIR": "other"}),
    ):
        assert snapshot_lines(given.stdout) == ["snapshots:     none under other"]


def test_status_of_a_database_that_never_synced(run_cli, tmp_path):
    open_store(tmp_path / "empty.db").close()
    result = run_cli("status", "--db", "empty.db")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[2:5] == [
        "last sync:     none yet; run `comfysync sync`",
        "runners:       0 present, 0 deleted",
        "versions:      0 recorded",
    ]


# -- runs -----------------------------------------------------------------------------------


def test_runs_prints_the_run_log_newest_first_in_80_columns(mirror: Mirror, run_cli):
    result = run_cli("runs", "--db", str(mirror.path))
    assert (result.exit_code, result.stderr) == (0, "")
    t = {n: shown(mirror.runs[n][0]) for n in (1, 2, 3)}
    s = {n: f"{seconds(mirror, n):.1f}" for n in (1, 2, 3)}
    assert result.stdout == (
        "  run  started (UTC)        status    secs    seen   new   upd   del  res  rej\n"
        f"    3  {t[3]}  failed  {s[3]:>6}       -     -     -     -    -    -\n"
        "       error: ComfyControl failed on page 1 after 1 attempts (HTTP 503); nothing\n"
        "         was applied, try again later\n"
        f"    2  {t[2]}  success {s[2]:>6}      12     1     2     1    0    0\n"
        f"    1  {t[1]}  success {s[1]:>6}      12    12     0     0    0    0\n"
    )
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_runs_filters_by_status_and_limits(mirror: Mirror, run_cli):
    failed = run_cli("runs", "--status", "failed", "--json", "--db", str(mirror.path))
    assert failed.exit_code == 0, failed.stderr
    assert json.loads(failed.stdout) == [run_json(mirror, 3)]
    latest = run_cli(
        "runs", "--limit", "2", "--status", "success", "--json", "--db", str(mirror.path)
    )
    assert json.loads(latest.stdout) == [run_json(mirror, 2), run_json(mirror, 1)]
    none = run_cli("runs", "--status", "partial", "--db", str(mirror.path))
    assert (none.exit_code, none.stdout) == (0, "no runs recorded\n")


# -- history --------------------------------------------------------------------------------


def renamed_history_text(mirror: Mirror) -> str:
    return (
        f"{mirror.renamed_after['id']}  renamed-runner  (present)\n"
        f"  v1   {shown(mirror.applied_at(1))} UTC  created   sync 1\n"
        f"  v2   {shown(mirror.applied_at(2))} UTC  updated   sync 2\n"
        '      name: "hunyuan-batch-eu-5" -> "renamed-runner"\n'
        '      updated_at: "2024-06-01T00:00:00Z" -> "2024-06-01T00:00:02Z"\n'
    )


@pytest.mark.parametrize(
    "how", ["full id", "unique id prefix", "upper-case prefix", "exact new name"]
)
def test_history_of_a_renamed_runner_shows_old_and_new_name(mirror: Mirror, run_cli, how):
    runner_id = mirror.renamed_after["id"]
    query = {
        "full id": runner_id,
        "unique id prefix": runner_id[:2],
        "upper-case prefix": runner_id[:6].upper(),
        "exact new name": "renamed-runner",
    }[how]
    result = run_cli("history", query, "--db", str(mirror.path))
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == renamed_history_text(mirror)


def test_history_of_a_rotated_header_keeps_the_values_redacted(mirror: Mirror, run_cli):
    runner_id = mirror.rotated_after["id"]
    old = mirror.stored(runner_id, "headers", 1)
    new = mirror.stored(runner_id, "headers", 2)
    assert old.startswith('{"Authorization":"redacted:') and new != old
    result = run_cli("history", "Research H100 Runner 535", "--db", str(mirror.path))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        f"{runner_id}  Research H100 Runner 535  (present)\n"
        f"  v1   {shown(mirror.applied_at(1))} UTC  created   sync 1\n"
        f"  v2   {shown(mirror.applied_at(2))} UTC  updated   sync 2\n"
        f"      headers: {old}\n"
        f"        -> {new}\n"
        '      updated_at: "2024-06-01T00:00:00Z" -> "2024-06-01T00:00:03Z"\n'
    )
    assert "rotated-secret" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_history_of_a_deleted_runner_by_its_name(mirror: Mirror, run_cli):
    result = run_cli("history", "flux-batch-ap-8", "--db", str(mirror.path))
    assert result.exit_code == 0, result.stderr
    at2 = shown(mirror.applied_at(2))
    assert result.stdout == (
        f"{mirror.deleted['id']}  flux-batch-ap-8  (deleted {at2} UTC)\n"
        f"  v1   {shown(mirror.applied_at(1))} UTC  created   sync 1\n"
        f"  v2   {at2} UTC  deleted   sync 2\n"
    )


def test_history_json(mirror: Mirror, run_cli):
    runner_id = mirror.rotated_after["id"]
    result = run_cli("history", runner_id[:8], "--json", "--db", str(mirror.path))
    assert result.exit_code == 0, result.stderr
    version = {"runner_id": runner_id, "name": "Research H100 Runner 535"}
    assert json.loads(result.stdout) == {
        "runner_id": runner_id,
        "name": "Research H100 Runner 535",
        "deleted_at": None,
        "matched": {"by": "id prefix", "version": None},
        "versions": [
            {**version, "version": 1, "change": "created",
             "changed_at": mirror.applied_at(1), "sync_id": 1, "fields": []},
            {**version, "version": 2, "change": "updated",
             "changed_at": mirror.applied_at(2), "sync_id": 2, "fields": [
                 {"field": "headers", "old_value": mirror.stored(runner_id, "headers", 1),
                  "new_value": mirror.stored(runner_id, "headers", 2)},
                 {"field": "updated_at", "old_value": "2024-06-01T00:00:00Z",
                  "new_value": "2024-06-01T00:00:03Z"},
             ]},
        ],
    }  # fmt: skip


def test_an_ambiguous_prefix_lists_the_candidates_and_exits_2(mirror: Mirror, run_cli):
    result = run_cli("history", "2", "--db", str(mirror.path))
    by_id = sorted(
        (r["id"], r["name"]) for r in [*mirror.upstream, mirror.deleted] if r["id"].startswith("2")
    )
    assert len(by_id) == 4
    candidates = ", ".join(f"{runner_id} ({name})" for runner_id, name in by_id)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"comfysync: error: '2' matches 4 runners: {candidates}; pass more of the id\n"
    )


def test_an_unknown_runner_exits_2_with_one_line(mirror: Mirror, run_cli):
    result = run_cli("history", "no-such-runner", "--db", str(mirror.path))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        "comfysync: error: no runner has or had the id, id prefix or name 'no-such-runner'; "
        "`comfysync changes --since 30d` lists recent ones\n"
    )


# -- changes --------------------------------------------------------------------------------


def second_sync_changes_text(mirror: Mirror) -> list[str]:
    at = shown(mirror.applied_at(2))
    rotated = mirror.rotated_after["id"]
    return [
        f"{at} UTC  created   {mirror.created['id'][:8]}  v1   fixture-new-runner",
        f"{at} UTC  deleted   {mirror.deleted['id'][:8]}  v2   flux-batch-ap-8",
        f"{at} UTC  updated   {rotated[:8]}  v2   Research H100 Runner 535",
        f"      headers: {mirror.stored(rotated, 'headers', 1)}",
        f"        -> {mirror.stored(rotated, 'headers', 2)}",
        '      updated_at: "2024-06-01T00:00:00Z" -> "2024-06-01T00:00:03Z"',
        f"{at} UTC  updated   {mirror.renamed_after['id'][:8]}  v2   renamed-runner",
        '      name: "hunyuan-batch-eu-5" -> "renamed-runner"',
        '      updated_at: "2024-06-01T00:00:00Z" -> "2024-06-01T00:00:02Z"',
    ]


def test_changes_since_a_moment_prints_exactly_the_second_syncs_changes(mirror: Mirror, run_cli):
    since = mirror.runs[2][0]  # sync 2 started after sync 1 applied its changes
    result = run_cli("changes", "--since", since, "--db", str(mirror.path))
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"4 change(s) since {shown(since)} UTC, newest first",
        *second_sync_changes_text(mirror),
    ]


def test_changes_since_24h_covers_both_syncs_newest_first(mirror: Mirror, run_cli):
    result = run_cli("changes", "--since", "24h", "--db", str(mirror.path))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("16 change(s) since ") and lines[0].endswith(" UTC, newest first")
    assert lines[1:10] == second_sync_changes_text(mirror)
    renamed = mirror.renamed_after["id"]
    v1_names = [
        (r["id"], "hunyuan-batch-eu-5" if r["id"] == renamed else r["name"])
        for r in [*mirror.upstream, mirror.deleted]
        if r["id"] != mirror.created["id"]
    ]
    at1 = shown(mirror.applied_at(1))
    assert lines[10:] == [
        f"{at1} UTC  created   {runner_id[:8]}  v1   {name}"
        for runner_id, name in sorted(v1_names, key=lambda pair: (pair[1], pair[0]))
    ]


def test_changes_json_has_the_history_shape(mirror: Mirror, run_cli):
    since = mirror.runs[2][0]
    result = run_cli("changes", "--json", "--since", since, "--db", str(mirror.path))
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["since"] == since
    assert [
        (c["change"], c["name"], c["version"], c["sync_id"], [f["field"] for f in c["fields"]])
        for c in document["changes"]
    ] == [
        ("created", "fixture-new-runner", 1, 2, []),
        ("deleted", "flux-batch-ap-8", 2, 2, []),
        ("updated", "Research H100 Runner 535", 2, 2, ["headers", "updated_at"]),
        ("updated", "renamed-runner", 2, 2, ["name", "updated_at"]),
    ]
    renamed = document["changes"][3]
    assert renamed == {
        "runner_id": mirror.renamed_after["id"],
        "name": "renamed-runner",
        "version": 2,
        "change": "updated",
        "changed_at": mirror.applied_at(2),
        "sync_id": 2,
        "fields": [
            {"field": "name", "old_value": "hunyuan-batch-eu-5", "new_value": "renamed-runner"},
            {
                "field": "updated_at",
                "old_value": "2024-06-01T00:00:00Z",
                "new_value": "2024-06-01T00:00:02Z",
            },
        ],
    }


def test_changes_in_an_empty_window_and_a_bad_since(mirror: Mirror, run_cli):
    future = run_cli("changes", "--since", "2999-01-01", "--db", str(mirror.path))
    assert (future.exit_code, future.stdout) == (0, "no changes since 2999-01-01 00:00:00 UTC\n")
    bad = run_cli("changes", "--since", "yesterday", "--db", str(mirror.path))
    assert (bad.exit_code, bad.stdout) == (2, "")
    assert bad.stderr == (
        "comfysync: error: --since 'yesterday' is neither a duration (90m, 24h, 7d) nor an ISO "
        "date or date and time (2026-11-01, 2026-11-01T12:00Z)\n"
    )


NOW = datetime(2026, 11, 28, 12, 30, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", "2026-11-28T11:00:00.000000Z"),
        ("24h", "2026-11-27T12:30:00.000000Z"),
        ("7d", "2026-11-21T12:30:00.000000Z"),
        ("2w", "2026-11-14T12:30:00.000000Z"),
        ("45s", "2026-11-28T12:29:15.000000Z"),
        (" 24H ", "2026-11-27T12:30:00.000000Z"),
        ("2026-11-01", "2026-11-01T00:00:00.000000Z"),
        ("2026-11-01T08:15", "2026-11-01T08:15:00.000000Z"),
        ("2026-11-01T08:15:30Z", "2026-11-01T08:15:30.000000Z"),
        ("2026-11-01T08:15:30+02:00", "2026-11-01T06:15:30.000000Z"),
    ],
)
def test_parse_since(text, expected):
    assert parse_since(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "24", "h", "-3d", "2026-13-01", "3y"])
def test_parse_since_refuses_what_it_cannot_read(text):
    with pytest.raises(ConfigurationError, match="--since"):
        parse_since(text, now=NOW)


# -- all of them ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("runs",),
        ("history", "anything"),
        ("changes", "--since", "1d"),
        ("browse",),
    ],
)
def test_a_missing_database_says_how_to_make_one_and_exits_2(run_cli, tmp_path, args):
    result = run_cli(*args, "--db", "absent.db")
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", NO_DB)
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("runs",),
        ("history", "anything"),
        ("changes", "--since", "1d"),
        ("browse",),
        ("export", "-o", "fleet.parquet"),
    ],
)
def test_a_missing_database_points_at_the_demo_database_when_there_is_one(run_cli, tmp_path, args):
    open_store(tmp_path / "data" / "demo.db").close()
    hint = (
        "comfysync: error: no database at {}; create one with `comfysync sync`, "
        "or read the demo's: `--db data/demo.db`\n"
    )
    by_default = run_cli(*args)
    assert (by_default.exit_code, by_default.stdout) == (2, "")
    assert by_default.stderr == hint.format("data/comfysync.db")
    from_environment = run_cli(*args, env={"COMFYSYNC_DB": "absent.db"})
    assert (from_environment.exit_code, from_environment.stderr) == (2, hint.format("absent.db"))
    assert not (tmp_path / "data" / "comfysync.db").exists()


def test_the_read_commands_never_write_the_database(mirror: Mirror, run_cli, tmp_path):
    copy = tmp_path / "copy.db"
    shutil.copy(mirror.path, copy)
    before = hashlib.sha256(copy.read_bytes()).hexdigest()
    for args in (
        ("status",),
        ("runs",),
        ("history", "renamed-runner"),
        ("changes", "--since", "7d"),
    ):
        for json_flag in ((), ("--json",)):
            assert run_cli(*args, *json_flag, "--db", "copy.db").exit_code == 0
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == before
    assert not Path(f"{copy}-wal").exists() or Path(f"{copy}-wal").stat().st_size == 0


# -- restorations and partial runs ----------------------------------------------------------


def test_a_restored_runner_and_a_partial_run(serve_account, run_cli, tmp_path):
    upstream = serve_account(runners=6, seed=3)
    account = upstream.account
    sync = (
        "sync",
        "--base-url",
        upstream.url,
        "--token",
        "test-token",
        "--db",
        "r.db",
        "--no-export",
    )
    assert run_cli(*sync).exit_code == 0
    gone = account.delete_runner(account.runner_ids()[1])
    assert run_cli(*sync).exit_code == 0
    account.create_runner(**{**gone, "name": "back-again"})
    account.faults.once("missing_id")
    assert run_cli(*sync, "--max-walks", "1").exit_code == 0

    history = run_cli("history", gone["id"][:10], "--db", "r.db")
    assert history.exit_code == 0, history.stderr
    [v1, v2, v3] = [
        shown(str(t[0]))
        for t in rows(
            tmp_path / "r.db",
            "SELECT min(valid_from) FROM runner_versions GROUP BY sync_id ORDER BY sync_id",
        )
    ]
    assert history.stdout == (
        f"{gone['id']}  back-again  (present)\n"
        f"  v1   {v1} UTC  created   sync 1\n"
        f"  v2   {v2} UTC  deleted   sync 2\n"
        f"  v3   {v3} UTC  restored  sync 3\n"
        f'      name: "{gone["name"]}" -> "back-again"\n'
    )

    started = {
        run_id: shown(str(at))
        for run_id, at in rows(tmp_path / "r.db", "SELECT id, started_at FROM sync_runs")
    }
    runs = run_cli("runs", "--limit", "1", "--db", "r.db").stdout.splitlines()
    assert runs[1].startswith(f"    3  {started[3]}  partial ")
    assert runs[1].split()[5:] == ["5", "0", "0", "0", "1", "1"]
    assert runs[2:] == [
        "       warning: no complete walk in 1 attempt(s): the head of the list changed",
        "         during the walk; saw 5 distinct runners but total is 6",
        "       warning: 1 runner record(s) could not be stored (see rejected_records)",
        "       warning: 1 runner(s) missing from the walk were NOT marked deleted",
        "         because the walk was not proven complete",
    ]
    status = run_cli("status", "--db", "r.db").stdout.splitlines()
    assert status[2].startswith(f"last sync:     #3 partial, {started[3]} UTC (")
    assert status[2].endswith(" s), walk NOT complete")
    assert status[3:] == [
        "               5 runners seen: 0 created, 0 updated, 0 deleted, 1 restored, 4",
        "               unchanged, 1 rejected",
        "               warning: no complete walk in 1 attempt(s): the head of the list",
        "                 changed during the walk; saw 5 distinct runners but total is 6",
        "               warning: 1 runner record(s) could not be stored (see",
        "                 rejected_records)",
        "               warning: 1 runner(s) missing from the walk were NOT marked",
        "                 deleted because the walk was not proven complete",
        f"last success:  #2, {started[2]} UTC",
        "runners:       6 present, 0 deleted",
        "versions:      8 recorded",
        "snapshots:     none under data/exports",
    ]
