"""Runners out of the store, into Parquet and CSV files with one explicit, stable schema.

Exports are how the data leaves comfysync, so every file is typed the same way, whatever
wrote it (a snapshot after a sync or ``comfysync export``):

* Parquet: the pyarrow schemas below, exactly. Strings; ``tags`` and ``changed_fields`` as
  ``list<string>``; ``headers`` as ``map<string, string>`` (values as stored, so redacted
  unless the store keeps them in clear); times as ``timestamp[us, tz=UTC]``; ``version`` and
  ``sync_id`` as int64; ``extra`` as JSON text (its shape is whatever the API sent).
* CSV: UTF-8, a header row, the same columns in the same order; times as ISO 8601 UTC with
  microseconds and a ``Z``; ``tags``/``headers``/``extra``/``changed_fields`` as JSON text;
  NULL as an empty field. ``csv_safe`` prefixes cells that a spreadsheet would run as a
  formula with ``'``.

Every file is written atomically (``snapshot.write_atomically``): a reader, or a crash, can
only ever see the previous file or the complete new one under the final name, never a
truncated one. Snapshots after a sync (``pipeline/outputs/series.py``) and ad-hoc exports
(``export_file``) both come through here; ``pipeline/outputs/snapshot.py`` owns the folder tree.
A snapshot may also be made from the previous snapshot file and the runners changed since
(``patched_rows``): the same bytes as a write from the store, for less work.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import struct
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.errors import ConfigurationError, ExportError
from pipeline.outputs.snapshot import (
    explain_write_failure,
    write_atomically,
)
from pipeline.read import history
from pipeline.read.history import RUN_COLUMNS, parse_instant
from pipeline.settings import EXPORT_FORMATS
from pipeline.store import schema

TIMESTAMP = pa.timestamp("us", tz="UTC")
STRINGS = pa.list_(pa.string())
HEADERS = pa.map_(pa.string(), pa.string())

#: The runner's own fields, in ``records.TRACKED_FIELDS`` order: the part both schemas share.
_RUNNER_FIELDS = [
    ("user_id", pa.string()),
    ("name", pa.string()),
    ("status", pa.string()),
    ("endpoint", pa.string()),
    ("tags", STRINGS),
    ("headers", HEADERS),
    ("created_at", TIMESTAMP),
    ("updated_at", TIMESTAMP),
    ("extra", pa.string()),
]
#: A runner's state in a snapshot or a current/--as-of export. ``sync_id`` and
#: ``snapshot_at`` say which sync left this state and when it was recorded. After them, the
#: columns follow ``history.FLEET_COLUMNS``, the order the store's rows arrive in.
FLEET_SCHEMA = pa.schema(
    [
        ("sync_id", pa.int64()),
        ("snapshot_at", TIMESTAMP),
        ("id", pa.string()),
        *_RUNNER_FIELDS,
        ("first_seen_at", TIMESTAMP),
        ("deleted_at", TIMESTAMP),
        ("version", pa.int64()),
        ("content_hash", pa.string()),
    ]
)
#: Every version of every runner (``--history``), in ``history.VERSION_COLUMNS`` order.
HISTORY_SCHEMA = pa.schema(
    [
        ("runner_id", pa.string()),
        ("version", pa.int64()),
        ("change", pa.string()),
        ("changed_fields", STRINGS),
        *_RUNNER_FIELDS,
        ("content_hash", pa.string()),
        ("valid_from", TIMESTAMP),
        ("valid_to", TIMESTAMP),
        ("sync_id", pa.int64()),
    ]
)
#: The run log (``sync_runs``), in ``history.RUN_COLUMNS`` order, for the Iceberg table:
#: counts as int64, ``complete`` as a boolean (stored as 0/1), ``warnings`` as JSON text.
_RUN_TYPES = {
    "started_at": TIMESTAMP,
    "finished_at": TIMESTAMP,
    "complete": pa.bool_(),
    **{name: pa.string() for name in ("status", "base_url", "warnings", "error")},
}
RUNS_SCHEMA = pa.schema([(name, _RUN_TYPES.get(name, pa.int64())) for name in RUN_COLUMNS])
#: Whose rows these are, in tables several databases share (the Iceberg tables).
ACCOUNT_FIELD = pa.field("account", pa.string(), nullable=False)
#: Cells a spreadsheet would evaluate (formula or DDE injection) when they start with these.
_FORMULA_START = r"^[=+\-@\t\r]"
#: Rows per Parquet row group: the store is read in small batches (``history.BATCH_ROWS``),
#: which are gathered, as compact Arrow columns, into row groups big enough to compress well
#: and small enough that a snapshot holds a modest window of the fleet, whatever its size.
ROW_GROUP_ROWS = 25_000


@dataclass(frozen=True)
class ExportRows:
    """What a file holds: the schema, and the store query that fills it.

    ``query`` (None: no rows) reads the schema's columns, in its order, from ``db``, without
    ``sync_id`` and ``snapshot_at`` for FLEET_SCHEMA: those come from here, the same for
    every row. It runs once however many formats are written from it.
    """

    schema: pa.Schema
    db: Any = None
    query: history.Query | None = None
    sync_id: int | None = None
    snapshot_at: str | None = None


@dataclass(frozen=True)
class ArrowBatch:
    """One batch of rows, converted once for every format.

    ``typed`` is in the schema's types (what Parquet holds); ``json_text`` has the store's
    own JSON text of each list and map column, which is what CSV shows: it is canonical
    already (orjson, sorted keys), so nothing needs to be serialised again.
    """

    typed: pa.RecordBatch
    json_text: dict[str, pa.Array]

    def as_csv(self, csv_safe: bool) -> pa.RecordBatch:
        """The rows as CSV shows them (``csv_schema``): times as ISO 8601 text, lists and
        maps as the store's JSON text, formulas neutralised if ``csv_safe``."""
        arrays = []
        for field, column in zip(self.typed.schema, self.typed.columns, strict=True):
            if field.name in self.json_text:
                column = self.json_text[field.name]
            elif pa.types.is_timestamp(field.type):
                column = _csv_times(column)
            arrays.append(column)
        text = pa.record_batch(arrays, schema=csv_schema(self.typed.schema))
        return _neutralise_formulas(text) if csv_safe else text


@dataclass(frozen=True)
class CsvBatch:
    """Rows read back from a CSV file, in its ``csv_schema``: only ever written as CSV, as
    they are (a snapshot patched from the previous one, ``pipeline.outputs.series``)."""

    text: pa.RecordBatch

    def as_csv(self, csv_safe: bool) -> pa.RecordBatch:
        """The rows as they were read: neutralised already if the file was ``csv_safe``."""
        return self.text


#: What an export file is given to write.
Batch = ArrowBatch | CsvBatch


class ExportFile(Protocol):
    """One file being written in one format, batch by batch."""

    def write(self, batch: Batch) -> None: ...

    def close(self) -> int:
        """Finish the file; returns the rows written."""
        ...


#: Opens ``format`` at ``path`` for rows of ``schema`` (``csv_safe`` for CSV). The default is
#: ``open_export_file``; tests substitute one that fails half-way.
FileWriter = Callable[[Path, str, pa.Schema, bool], ExportFile]


def format_for_path(path: Path) -> str:
    """``parquet`` or ``csv`` from the file's suffix; ConfigurationError for anything else."""
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise ConfigurationError(
            f"cannot tell the format of {path}: name the file *.parquet or *.csv"
        )
    return fmt


def open_export_file(path: Path, fmt: str, schema: pa.Schema, csv_safe: bool = False) -> ExportFile:
    """Start writing ``fmt`` at ``path`` (not atomically: see write_atomically)."""
    if fmt == "parquet":
        return _ParquetFile(path, schema)
    if fmt == "csv":
        return _CsvFile(path, schema, csv_safe)
    raise ValueError(f"unknown export format {fmt!r}")


def write_export_file(path: Path, fmt: str, rows: ExportRows, csv_safe: bool = False) -> int:
    """Write ``rows`` as Parquet or CSV to ``path`` (not atomically: see write_atomically)."""
    written = write_export_files({fmt: path}, rows, csv_safe)[fmt]
    if isinstance(written, Exception):
        raise written
    return written


def write_export_files(
    targets: Mapping[str, Path],
    rows: ExportRows,
    csv_safe: bool = False,
    open_file: FileWriter = open_export_file,
) -> dict[str, int | Exception]:
    """Write ``rows`` once in each format of ``targets`` ({format: path}), from one read.

    Each batch is read and converted to Arrow once, then handed to every file, so memory
    follows the batch, not the fleet, and the store is read once whatever the formats.
    Returns each format's rows, or the exception that stopped that file: one file failing
    (a full disk) does not stop the others; a failed read stops them all.
    """
    outcome: dict[str, int | Exception] = {}
    files: dict[str, ExportFile] = {}
    try:
        for fmt, path in targets.items():
            try:
                files[fmt] = open_file(path, fmt, rows.schema, csv_safe)
            except Exception as exc:
                outcome[fmt] = exc
        try:
            for batch in arrow_batches(rows) if files else ():
                for fmt, file in list(files.items()):
                    try:
                        file.write(batch)
                    except Exception as exc:
                        outcome[fmt] = exc
                        close_quietly(files.pop(fmt))
                if not files:
                    break
        except Exception as exc:  # the read or the conversion: every file open fails with it
            for fmt in list(files):
                outcome[fmt] = exc
                close_quietly(files.pop(fmt))
        for fmt in list(files):
            file = files.pop(fmt)
            try:
                outcome[fmt] = file.close()
            except Exception as exc:
                outcome[fmt] = exc
    finally:
        for file in files.values():  # only left open when interrupted (KeyboardInterrupt)
            close_quietly(file)
    return {fmt: outcome[fmt] for fmt in targets}


def close_quietly(file: ExportFile) -> None:
    with contextlib.suppress(Exception):  # it failed already: that error is the news
        file.close()


class _ParquetFile:
    """Gathers batches, as compact Arrow columns, into row groups big enough to compress well."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        # zstd: markedly smaller files than snappy for this data, about as fast, and read by
        # every tool the analysis page names.
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = self._rows = 0

    def write(self, batch: Batch) -> None:
        if not isinstance(batch, ArrowBatch):
            raise TypeError("a Parquet file is written from typed rows only")
        self._pending.append(batch.typed)
        self._pending_rows += batch.typed.num_rows
        self._rows += batch.typed.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        self._writer.write_table(pa.Table.from_batches(self._pending))
        self._pending, self._pending_rows = [], 0

    def close(self) -> int:
        try:
            if self._pending:
                self._flush()
        finally:
            self._writer.close()
        return self._rows


class _CsvFile:
    """Times as ISO 8601 text, lists and maps as the store's JSON text, the rest as typed."""

    def __init__(self, path: Path, schema: pa.Schema, csv_safe: bool) -> None:
        self._writer = pa_csv.CSVWriter(path, csv_schema(schema))
        self._csv_safe = csv_safe
        self._rows = 0

    def write(self, batch: Batch) -> None:
        text = batch.as_csv(self._csv_safe)
        self._writer.write_batch(text)
        self._rows += text.num_rows

    def close(self) -> int:
        self._writer.close()
        return self._rows


def csv_schema(schema: pa.Schema) -> pa.Schema:
    """The CSV view of a schema: times, lists and maps become text; the rest is unchanged."""
    return pa.schema([(f.name, pa.string() if _is_text_in_csv(f.type) else f.type) for f in schema])


def _is_text_in_csv(arrow_type: pa.DataType) -> bool:
    return bool(
        pa.types.is_timestamp(arrow_type)
        or pa.types.is_list(arrow_type)
        or pa.types.is_map(arrow_type)
    )


def arrow_batches(rows: ExportRows) -> Iterator[ArrowBatch]:
    """The rows, batch by batch, as typed Arrow columns, with no Python object per value.

    SQLite writes each row as one JSON object (``history.json_lines``) and pyarrow parses a
    batch of them in C into the schema's types: lists natively, times as text then cast. A
    map comes as the store's JSON text and is parsed apart (``_maps``). The store's own
    JSON text of each list and map comes along for CSV.
    """
    if rows.query is None:
        return
    expressions = dict(rows.query.columns)
    if rows.schema.equals(FLEET_SCHEMA):  # the same for every row, so not in the store's rows
        expressions["sync_id"] = str(int(rows.sync_id or 0))
        expressions["snapshot_at"] = "'{}'".format(str(rows.snapshot_at).replace("'", "''"))
    fields: list[tuple[str, str]] = []
    parsed: list[pa.Field] = []
    for field in rows.schema:
        name, expression = field.name, expressions[field.name]
        if pa.types.is_map(field.type):  # NULL as '{}' and a flag: the text is parsed again
            fields += [
                (name + _TEXT, f"coalesce({expression}, '{{}}')"),
                (name + _NULL, _value(pa.bool_(), f"{expression} IS NULL")),
            ]
            parsed += [pa.field(name + _TEXT, pa.string()), pa.field(name + _NULL, pa.bool_())]
        elif pa.types.is_list(field.type):
            fields += [(name, f"json({expression})"), (name + _TEXT, expression)]
            parsed += [pa.field(name, field.type), pa.field(name + _TEXT, pa.string())]
        else:
            fields.append((name, _value(field.type, expression)))
            parsed.append(pa.field(name, _as_read(field.type)))
    for chunk in _read_ahead(history.json_lines(rows.db, rows.query, fields)):
        table = _read_json_lines(chunk, pa.schema(parsed))
        arrays: list[pa.Array] = []
        json_text: dict[str, pa.Array] = {}
        for field in rows.schema:
            name = field.name
            if pa.types.is_map(field.type):
                text, null = _column(table, name + _TEXT), _column(table, name + _NULL)
                json_text[name] = pc.if_else(null, pa.nulls(len(text), pa.string()), text)
                column = _maps(text, null)
            else:
                column = _column(table, name)
                if pa.types.is_list(field.type):
                    json_text[name] = _column(table, name + _TEXT)
                elif pa.types.is_timestamp(field.type):
                    column = timestamps(column)
            arrays.append(column)
        yield ArrowBatch(pa.record_batch(arrays, schema=rows.schema), json_text)


def _column(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).chunk(0)


def _read_json_lines(lines: pa.Buffer | bytes, schema: pa.Schema) -> pa.Table:
    """Newline-separated JSON objects as a table of ``schema``, each column in one chunk."""
    return pa_json.read_json(
        pa.BufferReader(lines),
        # One block for all the lines: a single parse, and each column in one piece.
        read_options=pa_json.ReadOptions(use_threads=False, block_size=len(lines) + 1),
        parse_options=pa_json.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="error"
        ),
    )


def _read_ahead(chunks: Generator[bytes, None, None]) -> Iterator[bytes]:
    """``chunks``, the next one read on another thread while this one is converted.

    SQLite builds the rows' JSON and pyarrow parses and writes them with the GIL released,
    so the read and the rest of the export run on two cores at once.
    """
    # Leaving waits for a read under way, then ends the statement: the connection is free.
    with contextlib.closing(chunks), ThreadPoolExecutor(1, thread_name_prefix="export") as reader:
        pending = reader.submit(next, chunks, None)
        while (chunk := pending.result()) is not None:
            pending = reader.submit(next, chunks, None)
            yield chunk


#: The key under which a list or map column's stored JSON text travels beside its value.
_TEXT = ":text"
#: The key of the flag that a map column is NULL (its text then comes as ``{}``).
_NULL = ":null"
#: A JSON string, escapes included: a backslash always takes the next character with it.
_JSON_STRING = r'"(?:[^"\\]|\\.)*"'
_PAIRS = pa.schema([("v", pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())])))])


def _maps(text: pa.Array, null: pa.Array) -> pa.Array:
    """The store's JSON text of objects of strings as map<string, string>.

    pyarrow's JSON reader builds no maps, and SQLite's ``json_each`` cuts a value at a NUL
    character, so each object is rewritten as text, in C (``"name":"value"`` members as
    ``{"key":"name","value":"value"}``, the braces as brackets), parsed as a list of pairs,
    and the pairs' offsets and fields make the map; ``null`` marks the NULL ones.
    """
    members = pc.replace_substring_regex(
        text,
        pattern=rf"({_JSON_STRING})\s*:\s*({_JSON_STRING})",
        replacement=r'{"key":\1,"value":\2}',
    )
    lines = pc.replace_substring_regex(
        members, pattern=r"(?s)^\s*\{(.*)\}\s*$", replacement='{"v":[\\1]}\n'
    )
    _, offsets, values = lines.buffers()
    bounds = pa.Array.from_buffers(pa.int32(), len(lines) + 1, [None, offsets], lines.offset)
    start, end = bounds[0].as_py(), bounds[-1].as_py()
    text_of_all = values.slice(start, end - start)  # the values, end to end
    pairs = _column(_read_json_lines(text_of_all, _PAIRS), "v")
    entries = pairs.values
    return pa.MapArray.from_arrays(
        pairs.offsets, entries.field("key"), entries.field("value"), mask=null
    )


def _value(arrow_type: pa.DataType, expression: str) -> str:
    """SQL for a plain column: as stored, but a boolean (stored as 0/1) as JSON's own."""
    if pa.types.is_boolean(arrow_type):
        return f"json(CASE WHEN {expression} THEN 'true' WHEN NOT {expression} THEN 'false' END)"
    return expression


def _as_read(arrow_type: pa.DataType) -> pa.DataType:
    """The type a column is parsed as: times as text (``timestamps`` casts them)."""
    return pa.string() if pa.types.is_timestamp(arrow_type) else arrow_type


def _csv_times(times: pa.Array) -> pa.Array:
    """Times as CSV text: ISO 8601 UTC with microseconds and a ``Z``.

    Arrow's cast of a time without a zone prints ``YYYY-MM-DD HH:MM:SS.ffffff``, the same
    digits as ``strftime`` with far less work per value; the ``T`` and ``Z`` are added.
    """
    text = pc.cast(times.cast(pa.timestamp("us")), pa.string())
    return pc.replace_substring_regex(text, pattern=r"^(\S+) (\S+)$", replacement=r"\1T\2Z")


def timestamps(text: pa.Array) -> pa.Array:
    """Timestamps in UTC from ISO 8601 text; vectorised, with an exact fallback per value.

    Arrow parses the common shapes (``Z`` or an offset) in C. The API may also send a time
    without an offset (taken as UTC) or with nanoseconds (truncated to microseconds), which
    Arrow refuses: those go through the same parser as ``--as-of``.
    """
    try:
        return pc.cast(text, TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = text.to_pylist()
        return pa.array([None if v is None else parse_instant(v) for v in values], TIMESTAMP)


def _neutralise_formulas(batch: pa.RecordBatch) -> pa.RecordBatch:
    arrays = []
    for column in batch.columns:
        if pa.types.is_string(column.type):
            risky = pc.match_substring_regex(column, _FORMULA_START)
            escaped = pc.utf8_replace_slice(column, start=0, stop=0, replacement="'")
            column = pc.if_else(risky, escaped, column)
        arrays.append(column)
    return pa.record_batch(arrays, schema=batch.schema)


@dataclass(frozen=True)
class ExportResult:
    """What ``export_file`` wrote: the file, its format, its rows, and what they are."""

    path: Path
    format: str
    rows: int
    description: str


def export_file(
    db_path: Path,
    output: Path,
    *,
    as_of: str | None = None,
    include_deleted: bool = False,
    all_versions: bool = False,
    csv_safe: bool = False,
) -> ExportResult:
    """Export the store at ``db_path`` to ``output`` (Parquet or CSV, from its suffix).

    By default the fleet as the last applied sync left it; ``as_of`` (ISO 8601, a date
    meaning its start, UTC) the fleet as the store knew it at that instant, i.e. as the last
    sync finished by then left it; ``include_deleted`` adds deleted runners; ``all_versions``
    exports every version instead. Opens the database read-only, so it is safe during a sync.
    Raises ConfigurationError (or DatabaseError, ExportError) with a one-line reason.
    """
    fmt = format_for_path(output)
    if all_versions and (as_of is not None or include_deleted):
        raise ConfigurationError(
            "--history exports every version; it cannot be combined with --as-of or "
            "--include-deleted"
        )
    at = history.instant_text(as_of) if as_of is not None else None
    db = schema.open_store_read_only(db_path)
    try:
        rows, description = _what_to_export(db, at, include_deleted, all_versions)
        try:
            count = write_atomically(
                output, lambda temporary: write_export_file(temporary, fmt, rows, csv_safe)
            )
        except OSError as exc:
            reason = explain_write_failure(exc, output)
            raise ExportError(f"cannot write {output}: {reason}") from exc
    finally:
        db.close()
    return ExportResult(output, fmt, count, description)


def _what_to_export(
    db: Any, at: str | None, include_deleted: bool, all_versions: bool
) -> tuple[ExportRows, str]:
    # ``db`` is the read-only sqlite-utils Database; typed Any so that sqlite-utils stays a
    # dependency of the store layer only.
    if all_versions:
        return ExportRows(HISTORY_SCHEMA, db, history.versions_query()), "every version"
    applied = history.last_applied_sync(db, at)
    if applied is None:
        return ExportRows(FLEET_SCHEMA), "no sync had applied changes by then"
    which = "present or deleted" if include_deleted else "present"
    # As of the sync's own finish time: the same state as at ``at`` (no version is written
    # between syncs), and a sync committing meanwhile cannot slip into the file.
    rows = ExportRows(
        FLEET_SCHEMA,
        db,
        history.fleet_query(applied.finished_at, include_deleted=include_deleted),
        sync_id=applied.sync_id,
        snapshot_at=applied.finished_at,
    )
    return rows, f"runners {which} as of sync {applied.sync_id} at {applied.finished_at}"


def arrow_table(rows: ExportRows) -> pa.Table:
    """``rows`` as one Arrow table in their Parquet schema (for the Iceberg tables)."""
    return pa.Table.from_batches([b.typed for b in arrow_batches(rows)], schema=rows.schema)


def with_account(table: pa.Table, account: str) -> pa.Table:
    """``table`` with the ``account`` column added, ``account`` in every row."""
    return table.append_column(ACCOUNT_FIELD, pa.array([account] * len(table), pa.string()))


#: How much of a CSV file is parsed at a time.
CSV_BLOCK_BYTES = 1 << 18


class NotPatchable(Exception):
    """A snapshot file is not what its record says, so nothing is patched from it."""


def patched_rows(
    fmt: str,
    base: Path,
    recorded_rows: int,
    changed: list[ArrowBatch],
    gone: list[str],
    rows: ExportRows,
    csv_safe: bool,
) -> Iterator[Batch]:
    """The rows of ``rows`` (a FLEET_SCHEMA snapshot) made from the ``fmt`` snapshot file
    ``base`` (holding ``recorded_rows``): its rows less those of the runners ``gone``, plus
    ``changed`` (those runners now, sorted by id), merged by id, with the ``sync_id`` and
    ``snapshot_at`` of ``rows``. NotPatchable when the file is not as recorded.
    """
    shared = _shared_values(rows)
    if fmt == "parquet":
        news = pa.Table.from_batches([b.typed for b in changed], FLEET_SCHEMA)
        return _merged(_parquet_rows(base, recorded_rows), news, _strings(gone), shared, _typed)
    text = csv_schema(FLEET_SCHEMA)
    news = pa.Table.from_batches([b.as_csv(csv_safe) for b in changed], text)
    if csv_safe:
        _check_ids_unchanged(news.column("id"))
    shared = {name: _as_csv(name, value) for name, value in shared.items()}
    return _merged(_csv_rows(base, recorded_rows, csv_safe), news, _strings(gone), shared, CsvBatch)


def _parquet_rows(path: Path, recorded_rows: int) -> Iterator[Batch]:
    """The rows of a Parquet snapshot, checked against its schema and recorded row count."""
    with pq.ParquetFile(path) as file:
        if not file.schema_arrow.equals(FLEET_SCHEMA):
            raise NotPatchable("another schema")
        if file.metadata.num_rows != recorded_rows:
            raise NotPatchable("another row count than recorded")
        for batch in file.iter_batches(batch_size=history.BATCH_ROWS, use_threads=False):
            yield ArrowBatch(batch, {})


def _csv_rows(path: Path, recorded_rows: int, csv_safe: bool) -> Iterator[Batch]:
    """The rows of a CSV snapshot as written (text, the two integer columns as such),
    checked against its header and recorded row count (and, ``csv_safe``, its ids)."""
    text = csv_schema(FLEET_SCHEMA)
    reader = pa_csv.open_csv(
        path,
        # Small blocks: the reader holds several at once, and larger ones are no faster.
        read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        # As the writer writes them: NULL as an empty field, an empty text quoted.
        convert_options=pa_csv.ConvertOptions(
            column_types=text,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    with reader:
        if reader.schema.names != text.names:
            raise NotPatchable("another header")
        count = 0
        for batch in reader:
            count += batch.num_rows
            if csv_safe:
                _check_ids_unchanged(batch.column("id"))
            yield CsvBatch(batch.cast(text))
    if count != recorded_rows:
        raise NotPatchable("another row count than recorded")


def _merged(
    base: Iterator[Batch],
    news: pa.Table,
    gone: pa.Array,
    shared: Mapping[str, pa.Scalar],
    wrap: Callable[[pa.RecordBatch], Batch],
) -> Iterator[Batch]:
    """``base``'s rows (sorted by id) less ``gone``, and ``news`` (sorted by id), merged by
    id, with ``shared`` in every row, in batches of ``history.BATCH_ROWS`` as the store's
    reads come, so that the file is laid out as a write from the store lays it out."""
    pending: list[pa.Table] = []
    held = taken = 0
    last_id: str | None = None
    ids = news.column("id")
    for batch in base:
        rows = _rows_of(batch)
        rows = rows.filter(pc.invert(pc.is_in(rows.column("id"), value_set=gone)))
        if not rows.num_rows:
            continue
        last_id = _check_order(rows.column("id"), last_id)
        last = rows.column("id")[-1]  # a pyarrow scalar: a Python one would import pandas
        upto = taken + int(pc.sum(pc.less_equal(ids.slice(taken), last)).as_py() or 0)
        part = pa.concat_tables([rows, news.slice(taken, upto - taken)]).sort_by("id")
        taken = upto
        pending.append(part)
        held += part.num_rows
        if held >= history.BATCH_ROWS:
            pending, held = yield from _batches(pending, shared, wrap, whole_only=True)
    pending.append(news.slice(taken))
    yield from _batches(pending, shared, wrap, whole_only=False)


def _batches(
    pending: list[pa.Table],
    shared: Mapping[str, pa.Scalar],
    wrap: Callable[[pa.RecordBatch], Batch],
    *,
    whole_only: bool,
) -> Generator[Batch, None, tuple[list[pa.Table], int]]:
    """``pending`` with ``shared`` set, as batches of ``history.BATCH_ROWS`` rows (only whole
    ones if ``whole_only``); returns what is left over, and its row count."""
    table = pa.concat_tables(pending).combine_chunks()
    whole = table.num_rows - table.num_rows % history.BATCH_ROWS if whole_only else table.num_rows
    for name, value in shared.items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index), pa.repeat(value, table.num_rows))
    for batch in table.slice(0, whole).to_batches(max_chunksize=history.BATCH_ROWS):
        yield wrap(batch)
    rest = table.slice(whole)
    return [rest], rest.num_rows


def _rows_of(batch: Batch) -> pa.Table:
    return pa.Table.from_batches([batch.typed if isinstance(batch, ArrowBatch) else batch.text])


def _typed(batch: pa.RecordBatch) -> Batch:
    return ArrowBatch(batch, {})


def _check_order(ids: pa.ChunkedArray, previous: str | None) -> str:
    """The last of ``ids``, once they are shown to be sorted after ``previous``: the merge
    relies on it, and a file edited by hand might not be."""
    column = ids.combine_chunks()
    if pc.any(pc.less_equal(column.slice(1), column.slice(0, len(column) - 1))).as_py() or (
        previous is not None and column[0].as_py() <= previous
    ):
        raise NotPatchable("its ids are not in order")
    last: str = column[-1].as_py()
    return last


def _check_ids_unchanged(ids: pa.Array | pa.ChunkedArray) -> None:
    """Refuse a ``csv_safe`` CSV file whose ids may not be the runners' own: one that starts
    with a quote is either prefixed or was sent so, and the merge needs the ids themselves."""
    if pc.any(pc.starts_with(ids, pattern="'")).as_py():
        raise NotPatchable("an id starts with a quote or a formula character")


def _shared_values(rows: ExportRows) -> dict[str, pa.Scalar]:
    sync_id = struct.pack("<q", int(rows.sync_id or 0))
    return {
        "sync_id": pa.Array.from_buffers(pa.int64(), 1, [None, pa.py_buffer(sync_id)])[0],
        "snapshot_at": timestamps(_strings([str(rows.snapshot_at)]))[0],
    }


def _as_csv(name: str, value: pa.Scalar) -> pa.Scalar:
    """A shared value as CSV shows it (the same conversion as every other row's)."""
    one = ArrowBatch(pa.record_batch([pa.repeat(value, 1)], names=[name]), {})
    return one.as_csv(False).column(0)[0]


def _strings(values: list[str]) -> pa.Array:
    """``values`` as an Arrow string array, built from its buffers: making one from Python
    objects (``pa.array``) has pyarrow import pandas to check for its types, which costs a
    sync more than the whole patch."""
    encoded = [value.encode() for value in values]
    offsets = array.array("i", itertools.accumulate(map(len, encoded), initial=0))
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)
