"""The text that ``status``, ``runs``, ``history`` and ``changes`` print, from their values.

Plain functions from the read modules' dataclasses to strings (no click, no SQL), so each
output is tested exactly. Lines fit an 80-column terminal, except a single value (a path, a
long endpoint) that is itself wider: values are never cut. Times are shown to the second in
UTC; ``--json`` carries them in full. Every value that came from upstream, the user or the
disk goes through ``pipeline.printable`` field by field, so it can neither drive the terminal
nor add a line; the reports' own line breaks are the only ones.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence

from pipeline.printable import printable, printable_json
from pipeline.read.changelog import BY_FORMER_NAME, FieldChange, RunnerHistory, VersionEntry
from pipeline.read.overview import MirrorStatus, Snapshots, SyncRun

WIDTH = 80
#: Columns that hold JSON text: shown as stored (compact), not quoted again.
JSON_FIELDS = frozenset(("tags", "headers", "extra"))
_LABEL = 15
_FIELD_INDENT = " " * 6
_RUN_ROW = "{:>5}  {:<19}  {:<14} {:>7} {:>5} {:>5} {:>5} {:>4} {:>4}"


def show_time(timestamp: str | None) -> str:
    """``2026-11-28T19:05:12.123456Z`` as ``2026-11-28 19:05:12``."""
    return timestamp[:19].replace("T", " ") if timestamp else "-"


def human_size(size: int) -> str:
    """Bytes in decimal units, with one decimal above 1000 bytes: ``196.6 kB``."""
    if size < 1000:
        return f"{size} B"
    value, units = size / 1000, ["kB", "MB", "GB", "TB"]
    while value >= 1000 and len(units) > 1:
        value, units = value / 1000, units[1:]
    return f"{value:.1f} {units[0]}"


def _wrap(text: str, indent: str, first_indent: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent if first_indent is None else first_indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def _labelled(label: str, lines: Sequence[str]) -> list[str]:
    pad = " " * _LABEL
    return [f"{label + ':':<{_LABEL}}{lines[0]}", *(pad + line for line in lines[1:])]


def _counts(run: SyncRun) -> str:
    return (
        f"{run.runners_seen} runners seen: {run.created} created, {run.updated} updated, "
        f"{run.deleted} deleted, {run.restored} restored, {run.unchanged} unchanged, "
        f"{run.rejected} rejected"
    )


def _run_notes(run: SyncRun, indent: str) -> list[str]:
    """The error of a failed run and the warnings of a partial one, wrapped."""
    notes = [f"error: {printable(run.error)}"] if run.error else []
    notes += [f"warning: {printable(warning)}" for warning in run.warnings]
    return [line for note in notes for line in _wrap(note, indent + "  ", indent)]


def describe_status(status: MirrorStatus) -> str:
    """The ``comfysync status`` report."""
    pad = " " * _LABEL
    lines = _labelled(
        "database", [f"{printable(status.db_path)} ({human_size(status.size_bytes)})"]
    )
    lines += _labelled("schema", [f"version {status.schema_version}"])
    if status.database_id is not None:
        lines += _labelled("database id", [f"{status.database_id} (its rows' account in Iceberg)"])
    last = status.last_sync
    if last is None:
        lines += _labelled("last sync", ["none yet; run `comfysync sync`"])
    else:
        took = f" ({last.seconds:.1f} s)" if last.seconds is not None else ""
        head = f"#{last.id} {last.status}, {show_time(last.started_at)} UTC{took}"
        if last.complete is not None:
            head += ", walk complete" if last.complete else ", walk NOT complete"
        body = [head]
        if last.runners_seen is not None:
            body += [line.strip() for line in _wrap(_counts(last), pad)]
        lines += _labelled("last sync", body)
        lines += _run_notes(last, pad)
        if status.last_success is None:
            lines += _labelled("last success", ["never"])
        elif status.last_success.id != last.id:
            success = status.last_success
            lines += _labelled(
                "last success", [f"#{success.id}, {show_time(success.started_at)} UTC"]
            )
    lines += _labelled(
        "runners", [f"{status.runners_present} present, {status.runners_deleted} deleted"]
    )
    lines += _labelled("versions", [f"{status.versions} recorded"])
    lines += _describe_snapshots(status.snapshots, pad)
    return "\n".join(lines)


def _describe_snapshots(snapshots: Snapshots, pad: str) -> list[str]:
    """The snapshot lines of ``status``: how many, oldest, newest, then what is wrong."""
    export_dir = printable(snapshots.export_dir)
    if snapshots.files == 0:
        lines = _labelled("snapshots", [f"none under {export_dir}"])
    else:
        lines = _labelled(
            "snapshots",
            [
                f"{snapshots.files} file(s) under {export_dir}",
                f"oldest {printable(str(snapshots.oldest))}",
                f"newest {printable(str(snapshots.newest))}",
            ],
        )
    kept: dict[tuple[int, int], list[str]] = {}
    for record in snapshots.latest:
        if record.file_sync_id != record.sync_id:
            kept.setdefault((record.sync_id, record.file_sync_id), []).append(record.format)
    for (sync_id, file_sync_id), formats in kept.items():
        lines += _wrap(
            f"sync {sync_id}: fleet unchanged, kept sync {file_sync_id}'s {' and '.join(formats)}",
            pad,
        )
    problems = [
        f"DAMAGED (sync {d.sync_id} wrote {d.written_bytes} bytes, now {d.bytes}): "
        f"{printable(d.path)}"
        for d in snapshots.damaged
    ] + [
        f"NOT written (sync {f.sync_id}, {f.format}): {printable(f.error)}"
        for f in snapshots.not_written
    ]
    return lines + [line for problem in problems for line in _wrap(problem, pad + "  ", pad)]


def _status_and_secs(status: str, seconds: str) -> str:
    """The status and seconds columns; a longer status (``interrupted``, whose seconds are
    ``-``) takes the room the seconds leave, so the columns after it stay aligned."""
    cell = f"{status:<7} {seconds:>6}"
    if len(cell) > 14:
        cell = f"{status} {seconds:>{max(1, 13 - len(status))}}"
    return cell


def describe_runs(runs: Sequence[SyncRun]) -> str:
    """The run log as a table, newest first, with each run's error or warnings under it."""
    if not runs:
        return "no runs recorded"
    header = _RUN_ROW.format(
        "run", "started (UTC)", _status_and_secs("status", "secs"), "seen", "new", "upd", "del",
        "res", "rej",
    )  # fmt: skip
    lines = [header]
    for run in runs:
        counts = (
            run.runners_seen,
            run.created,
            run.updated,
            run.deleted,
            run.restored,
            run.rejected,
        )
        seconds = f"{run.seconds:.1f}" if run.seconds is not None else "-"
        lines.append(
            _RUN_ROW.format(
                run.id,
                show_time(run.started_at),
                _status_and_secs(run.status, seconds),
                *("-" if count is None else count for count in counts),
            ).rstrip()
        )
        lines += _run_notes(run, " " * 7)
    return "\n".join(lines)


def show_value(field: str, value: str | None) -> str:
    """A stored value as one token: JSON columns as their compact JSON, text quoted as JSON.

    Either way it is JSON with every control character escaped (``printable_json``), so it
    reads back as the exact value.
    """
    if value is None:
        return "null"
    if field in JSON_FIELDS:
        return printable_json(value)
    return printable_json(json.dumps(value, ensure_ascii=False))


def _field_lines(change: FieldChange) -> list[str]:
    old = show_value(change.field, change.old_value)
    new = show_value(change.field, change.new_value)
    line = f"{_FIELD_INDENT}{change.field}: {old} -> {new}"
    if len(line) <= WIDTH:
        return [line]
    return [f"{_FIELD_INDENT}{change.field}: {old}", f"{_FIELD_INDENT}  -> {new}"]


def _version_lines(head: str, entry: VersionEntry) -> list[str]:
    return [head, *(line for change in entry.fields for line in _field_lines(change))]


def describe_history(history: RunnerHistory) -> str:
    """Every version of one runner, oldest first, with each changed field as old -> new;
    when it was found by a former name, which version had that name."""
    state = f"deleted {show_time(history.deleted_at)} UTC" if history.deleted_at else "present"
    lines = [f"{printable(history.runner_id)}  {printable(history.name)}  ({state})"]
    matched = history.matched
    if matched is not None and matched.by == BY_FORMER_NAME:
        for entry in history.versions:
            if entry.version == matched.version:
                name = show_value("name", entry.name)
                lines.append(f"  found by former name {name} (the name in v{entry.version})")
    for entry in history.versions:
        head = (
            f"  v{entry.version:<3} {show_time(entry.changed_at)} UTC  "
            f"{entry.change:<8}  sync {entry.sync_id}"
        )
        lines += _version_lines(head, entry)
    return "\n".join(lines)


def describe_changes(entries: Sequence[VersionEntry], since: str) -> str:
    """Every version since a moment, newest first, in the shape of ``describe_history``."""
    if not entries:
        return f"no changes since {show_time(since)} UTC"
    lines = [f"{len(entries)} change(s) since {show_time(since)} UTC, newest first"]
    for entry in entries:
        head = (
            f"{show_time(entry.changed_at)} UTC  {entry.change:<8}  "
            f"{printable(entry.runner_id[:8])}  v{entry.version:<3} {printable(entry.name)}"
        )
        lines += _version_lines(head, entry)
    return "\n".join(lines)
