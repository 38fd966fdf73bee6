"""Prometheus metrics of a mirror, read from its database at each scrape or textfile write.

Every figure comes from the database (the run log, the runners, the snapshot index and the
retry count in ``comfysync_meta``), never from a process's memory: ``/metrics`` of a
long-running ``comfysync schedule`` and the textfile a cron ``sync --metrics-file`` writes
say the same thing, and counters keep counting across restarts. Names follow Prometheus'
conventions: the ``comfysync_`` prefix, base units (seconds), ``_total`` on counters. No
metric carries a label value from upstream except runner statuses, which are escaped by the
exposition format.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pipeline.errors import ComfySyncError
from pipeline.observe.runlog import failures_in_a_row
from pipeline.store.meta import read_meta
from pipeline.store.schema import open_store_read_only
from pipeline.store.sqlite import Database
from pipeline.store.write import RETRIES_META
from pipeline.times import utc_instant

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the sync duration histogram's buckets.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
CHANGE_COLUMNS = ("created", "updated", "deleted", "restored")


class MirrorCollector:
    """A prometheus_client collector over the database at ``db_path``, opened read-only per
    collection (so it never holds the file between scrapes, and never blocks a sync)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[Metric]:
        readable = GaugeMetricFamily(
            "comfysync_database_readable",
            "1 if the mirror's database could be read for these metrics, else 0.",
        )
        try:
            with closing(open_store_read_only(self.db_path)) as db:
                families = list(_families(db))
        except ComfySyncError as exc:
            log.info("metrics: %s", exc.message)
            readable.add_metric([], 0)
            yield readable
            return
        readable.add_metric([], 1)
        yield readable
        yield from families


def _timestamp(text: str | None) -> float | None:
    return None if text is None else utc_instant(text).timestamp()


def _families(db: Database) -> Iterator[Metric]:
    started, finished = db.execute(
        "SELECT max(started_at), max(finished_at) FROM sync_runs"
    ).fetchone()
    (success,) = db.execute(
        "SELECT max(finished_at) FROM sync_runs WHERE status = 'success'"
    ).fetchone()
    for name, doc, value in (
        ("comfysync_last_sync_start_timestamp_seconds", "When the latest sync started.", started),
        ("comfysync_last_sync_finish_timestamp_seconds", "When the latest sync ended.", finished),
        (
            "comfysync_last_success_timestamp_seconds",
            "When the latest sync that ended success finished.",
            success,
        ),
    ):
        seconds = _timestamp(value)
        if seconds is not None:
            yield GaugeMetricFamily(name, doc, value=seconds)

    runs = CounterMetricFamily(
        "comfysync_sync_runs", "Sync runs by outcome: success, partial, failed.", labels=["outcome"]
    )
    changes = CounterMetricFamily(
        "comfysync_changes", "Runner versions recorded, by kind of change.", labels=["kind"]
    )
    totals: dict[str, float] = dict.fromkeys(CHANGE_COLUMNS, 0)
    pages = 0.0
    sums = ", ".join(f"coalesce(sum({column}), 0)" for column in CHANGE_COLUMNS)
    rows = db.execute(
        f"SELECT status, count(*), coalesce(sum(pages), 0), {sums} FROM sync_runs "
        "WHERE status != 'running' GROUP BY status ORDER BY status"
    ).fetchall()
    for status, count, status_pages, *counts in rows:
        runs.add_metric([status], count)
        pages += status_pages
        for column, value in zip(CHANGE_COLUMNS, counts, strict=True):
            totals[column] += value
    for column in CHANGE_COLUMNS:
        changes.add_metric([column], totals[column])
    yield runs
    yield changes
    yield CounterMetricFamily("comfysync_pages", "Pages read by syncs that applied.", value=pages)
    retries = read_meta(db, RETRIES_META)
    yield CounterMetricFamily(
        "comfysync_retries", "Page requests retried by syncs.", value=int(retries or 0)
    )
    yield _durations(db)
    yield GaugeMetricFamily(
        "comfysync_consecutive_failures",
        "Sync runs failed in a row since the last success or partial one.",
        value=failures_in_a_row(db),
    )
    runners = GaugeMetricFamily(
        "comfysync_runners", "Present (not deleted) runners by status.", labels=["status"]
    )
    for status, count in db.execute(
        "SELECT coalesce(status, ''), count(*) FROM runners WHERE deleted_at IS NULL "
        "GROUP BY 1 ORDER BY 1"
    ):
        runners.add_metric([status], count)
    yield runners
    (deleted,) = db.execute("SELECT count(*) FROM runners WHERE deleted_at IS NOT NULL").fetchone()
    yield GaugeMetricFamily("comfysync_runners_deleted", "Runners marked deleted.", value=deleted)
    (failed,) = db.execute("SELECT count(*) FROM snapshots WHERE error IS NOT NULL").fetchone()
    yield CounterMetricFamily(
        "comfysync_snapshot_write_failures", "Snapshot files a sync could not write.", value=failed
    )


def _durations(db: Database) -> HistogramMetricFamily:
    seconds = [
        (utc_instant(end) - utc_instant(start)).total_seconds()
        for start, end in db.execute(
            "SELECT started_at, finished_at FROM sync_runs "
            "WHERE status != 'running' AND finished_at IS NOT NULL"
        )
    ]
    buckets: list[tuple[str, float]] = [
        (str(float(bound)), sum(1 for s in seconds if s <= bound)) for bound in DURATION_BUCKETS
    ]
    buckets.append(("+Inf", len(seconds)))
    return HistogramMetricFamily(
        "comfysync_sync_duration_seconds",
        "How long sync runs took, from start to end.",
        buckets=buckets,
        sum_value=sum(seconds),
    )


def mirror_registry(db_path: Path) -> CollectorRegistry:
    """A registry of our own (not prometheus_client's global one) holding the mirror's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MirrorCollector(db_path))
    return registry


def write_metrics_file(db_path: Path, path: Path) -> str | None:
    """Write the metrics in the node_exporter textfile format, atomically (a temporary file
    renamed over ``path``). Returns None, or a warning if it could not be written."""
    from prometheus_client import write_to_textfile

    try:
        write_to_textfile(str(path), mirror_registry(db_path))
    except OSError as exc:
        return f"metrics file {path} not written ({exc.strerror or type(exc).__name__})"
    return None


def serve_metrics(db_path: Path, *, host: str, port: int) -> Any:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the server (call
    ``shutdown()`` to stop it). OSError if the address cannot be bound."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=mirror_registry(db_path))
    return server
