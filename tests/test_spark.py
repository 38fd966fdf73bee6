"""A distributed engine reads the snapshot dataset: Spark (local mode) over the Hive-partitioned
Parquet tree, answering a count by status per snapshot date equal to the store's.

Needs pyspark and Java (``pip install -e '.[spark]'``; Java from the system packages, e.g.
``apt-get install default-jre-headless``), so it runs only when asked: ``pytest -m spark``.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime

import pytest
from conftest import churn, settings_for
from export_helpers import StepClock, finished_at, store_fleet

from pipeline.sync.run import run_sync

pytestmark = pytest.mark.spark


def test_spark_counts_runners_by_status_per_snapshot_date_as_the_store_does(
    serve_account, db_path, tmp_path, monkeypatch
):
    from pyspark.sql import SparkSession

    upstream = serve_account(runners=300, seed=19)
    export_dir = tmp_path / "exports"
    settings = settings_for(upstream, db_path, export_dir=export_dir)
    clock = StepClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
    expected: Counter[tuple[date, str]] = Counter()
    for step in range(3):
        summary = run_sync(settings, clock=clock)
        fleet = store_fleet(
            db_path, sync_id=summary.sync_id, snapshot_at=finished_at(db_path, summary.sync_id)
        )
        expected.update((date(2026, 3, 1 + step), runner["status"]) for runner in fleet)
        churn(upstream.account, step)
        clock.jump_to(datetime(2026, 3, 2 + step, 9, 0, tzinfo=UTC))

    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("comfysync-snapshots")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    try:
        snapshots = spark.read.parquet(str(export_dir / "parquet" / "runners"))
        snapshots.createOrReplaceTempView("snapshots")
        query = spark.sql(
            "SELECT snapshot_date, status, count(*) AS runners FROM snapshots "
            "GROUP BY snapshot_date, status ORDER BY snapshot_date, status"
        )
        query.show(truncate=False)  # the closing note quotes this table (pytest -s)
        found = {(row.snapshot_date, row.status): row.runners for row in query.collect()}
    finally:
        spark.stop()
    assert found == dict(expected)
    assert len({day for day, _ in found}) == 3
