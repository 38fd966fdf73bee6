"""Snapshots in object storage and the mirror as Apache Iceberg tables, on real parts: moto's
S3 server on 127.0.0.1 (the S3 protocol, a real bucket), pyiceberg with a SQLite catalog,
and the files read back with pyarrow and DuckDB."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
from conftest import churn, rows, settings_for
from export_helpers import StepClock, finished_at, parquet_rows, store_fleet, store_history

from pipeline.outputs import iceberg
from pipeline.sync.run import run_sync

DAYS = [datetime(2026, 3, day, 9, 0, tzinfo=UTC) for day in (1, 2, 3)]


def sync_snapshot(table, account: str, sync_id: int):
    """The id of the snapshot that holds ``account``'s rows as sync ``sync_id`` left them."""
    found = [
        snapshot
        for snapshot in table.snapshots()
        if snapshot.summary is not None
        and snapshot.summary.get(iceberg.ACCOUNT_PROPERTY) == account
        and snapshot.summary.get(iceberg.SYNC_PROPERTY) == str(sync_id)
    ]
    return max(found, key=lambda s: s.sequence_number).snapshot_id if found else None


def sync_env(store, upstream) -> dict[str, str]:
    return {**store.env, "COMFYCONTROL_TOKEN": upstream.account.token}


def test_snapshots_go_to_a_bucket_are_pruned_there_and_read_back_with_pyarrow_and_duckdb(
    s3_store, serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=60, seed=19)
    bucket = s3_store.bucket("snapshots")
    sync = (
        "sync", "--base-url", upstream.url, "--db", "mirror.db",
        "--export-dir", f"{bucket}/team/exports", "--s3-endpoint-url", s3_store.endpoint,
        "--keep-snapshots", "2",
    )  # fmt: skip
    for step in range(3):
        result = run_cli(*sync, env=sync_env(s3_store, upstream))
        assert result.exit_code == 0, result.stderr
        assert "snapshot not written" not in result.stderr
        churn(upstream.account, step)

    fs = s3_store.filesystem()
    listed = sorted(
        info.path
        for info in fs.get_file_info(pa.fs.FileSelector("snapshots/team", recursive=True))
        if info.type == pa.fs.FileType.File
    )
    # The same Hive layout as on disk, pruned to the two newest per format; no temporaries.
    assert [path.rsplit("/", 1)[1] for path in listed] == [
        "runners-2.csv", "runners-3.csv", "runners-2.parquet", "runners-3.parquet",
    ]  # fmt: skip
    assert all("/runners/snapshot_date=" in path for path in listed)
    recorded = rows(
        tmp_path / "mirror.db", "SELECT path, bytes, error FROM snapshots WHERE sync_id = 3"
    )
    assert [(path.startswith("s3://snapshots/team/exports/"), error) for path, _, error in recorded] == [
        (True, None), (True, None),
    ]  # fmt: skip
    assert {fs.get_file_info(path.removeprefix("s3://")).size for path, _, _ in recorded} == {
        size for _, size, _ in recorded
    }

    # pyarrow reads the partitioned dataset straight from the bucket: the store's fleet.
    dataset = ds.dataset(
        "snapshots/team/exports/parquet/runners", filesystem=fs, partitioning="hive"
    )
    latest = dataset.to_table(filter=ds.field("sync_id") == 3).drop_columns(["snapshot_date"])
    expected = store_fleet(
        tmp_path / "mirror.db", sync_id=3, snapshot_at=finished_at(tmp_path / "mirror.db", 3)
    )
    assert sorted(parquet_rows(latest), key=lambda r: r["id"]) == expected
    # DuckDB over the same dataset (its S3 extension is not available offline).
    counts = duckdb.sql(
        "SELECT sync_id, count(*) FROM dataset GROUP BY sync_id ORDER BY sync_id"
    ).fetchall()
    assert counts == [(2, 60), (3, 60)]

    status = run_cli(
        "status", "--db", "mirror.db", "--json", "--s3-endpoint-url", s3_store.endpoint,
        env=s3_store.env,
    )  # fmt: skip
    assert status.exit_code == 0, status.stderr
    snapshots = json.loads(status.stdout)["snapshots"]
    assert snapshots["export_dir"] == "s3://snapshots/team/exports"
    assert snapshots["files"] == 4
    assert snapshots["damaged"] == []
    assert snapshots["newest"].endswith("runners-3.parquet")


def test_a_failed_upload_is_a_recorded_warning_and_the_sync_still_succeeds(
    s3_store, serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=5, seed=2)
    result = run_cli(
        "sync", "--base-url", upstream.url, "--db", "mirror.db",
        "--export-dir", "s3://no-such-bucket/exports", "--s3-endpoint-url", s3_store.endpoint,
        env=sync_env(s3_store, upstream),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "snapshot not written" in line]
    assert len(warnings) == 2, result.stderr
    assert all("could not upload s3://no-such-bucket/exports/" in line for line in warnings)
    assert "Traceback" not in result.stderr
    recorded = rows(tmp_path / "mirror.db", "SELECT format, rows, error IS NOT NULL FROM snapshots")
    assert recorded == [("parquet", None, 1), ("csv", None, 1)]
    assert rows(tmp_path / "mirror.db", "SELECT status FROM sync_runs") == [("success",)]


def iceberg_settings(upstream, db_path: Path, catalog: str, warehouse: str, **options):
    return settings_for(upstream, db_path, iceberg=catalog, iceberg_warehouse=warehouse, **options)


def test_three_syncs_in_iceberg_equal_the_store_now_and_at_each_sync(
    s3_store, serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=80, seed=7)
    db_path = tmp_path / "mirror.db"
    warehouse = s3_store.bucket("lake") + "/warehouse"
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    settings = iceberg_settings(
        upstream, db_path, catalog_uri, warehouse, s3_endpoint_url=s3_store.endpoint
    )
    clock = StepClock(DAYS[0])
    for step in range(3):
        summary = run_sync(settings, clock=clock)
        assert summary.status == "success" and summary.warnings == ()
        assert summary.iceberg_rows["runners"] == 80  # each step: one born, one deleted
        churn(upstream.account, step)
        if step < 2:
            clock.jump_to(DAYS[step + 1])

    account = rows(db_path, "SELECT value FROM comfysync_meta WHERE key = 'database_id'")[0][0]
    assert account.startswith("db-")
    catalog = iceberg.load_catalog(
        iceberg.IcebergTarget(catalog_uri, warehouse, account, s3_store.endpoint)
    )
    runners = catalog.load_table("comfysync.runners")
    versions = catalog.load_table("comfysync.runner_versions")
    runs = catalog.load_table("comfysync.sync_runs")

    def without_account(table: pa.Table) -> list[dict]:
        assert set(table.column("account").to_pylist()) <= {account}
        return sorted(parquet_rows(table.drop_columns(["account"])), key=lambda r: r["id"])

    # Now: the table is the store's present runners, as the third sync left them.
    assert without_account(runners.scan().to_arrow()) == store_fleet(
        db_path, sync_id=3, snapshot_at=finished_at(db_path, 3)
    )
    # Time travel to each sync's snapshot: `comfysync export --as-of` of that sync.
    for sync_id in (1, 2, 3):
        snapshot_id = sync_snapshot(runners, account, sync_id)
        assert snapshot_id is not None
        summary = runners.snapshot_by_id(snapshot_id).summary
        assert summary[iceberg.SYNC_PROPERTY] == str(sync_id)
        assert summary[iceberg.ACCOUNT_PROPERTY] == account
        output = tmp_path / f"as-of-{sync_id}.parquet"
        export = run_cli(
            "export", "--db", "mirror.db", "--as-of", finished_at(db_path, sync_id),
            "--output", str(output),
        )  # fmt: skip
        assert export.exit_code == 0, export.stderr
        travelled = runners.scan(snapshot_id=snapshot_id).to_arrow()
        assert without_account(travelled) == sorted(parquet_rows(output), key=lambda r: r["id"])
    # Every version with its validity interval, closed intervals included, as in SQLite.
    history = versions.scan().to_arrow().drop_columns(["account"])
    assert sorted(parquet_rows(history), key=lambda r: (r["runner_id"], r["version"])) == (
        store_history(db_path)
    )
    # Two synced churns, each closing four intervals (rename, update, rotation, deletion).
    assert sum(1 for r in store_history(db_path) if r["valid_to"] is not None) == 8
    # The run log, one row per sync, and its partitioning by account and month.
    assert sorted(runs.scan().to_arrow().column("id").to_pylist()) == [1, 2, 3]
    assert [f.name for f in versions.spec().fields] == ["account", "valid_from_month"]
    # Redaction as in SQLite: no clear header value of the account reached the warehouse.
    clear = {
        value
        for runner in upstream.account.list_runners()
        for value in (runner.get("headers") or {}).values()
    }
    stored = {v for r in history.column("headers").to_pylist() for _, v in r or []}
    assert clear and stored and not clear & stored


def test_a_newer_column_is_added_to_an_existing_table_without_a_rewrite(serve_account, tmp_path):
    upstream = serve_account(runners=6, seed=4)
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    warehouse = str(tmp_path / "warehouse")
    target = iceberg.IcebergTarget(
        catalog_uri, iceberg.default_warehouse(tmp_path / "x.db", warehouse), "old"
    )
    catalog = iceberg.load_catalog(target)
    older = iceberg.arrow_schema("runners")
    older = older.remove(older.get_field_index("content_hash"))
    table = catalog.create_table("comfysync.runners", schema=older)
    table.append(pa.Table.from_pylist([], schema=older))
    before = table.current_snapshot().snapshot_id

    settings = iceberg_settings(upstream, tmp_path / "m.db", catalog_uri, warehouse)
    assert run_sync(settings).iceberg_rows["runners"] == 6
    table = catalog.load_table("comfysync.runners")
    assert table.schema().column_names[-1] == "content_hash"  # added, at the end
    assert before in {s.snapshot_id for s in table.snapshots()}  # history kept, not rewritten
    assert len(table.scan().to_arrow()) == 6


def test_three_accounts_committing_at_once_all_land(s3_store, serve_account, start_cli, tmp_path):
    upstreams = [serve_account(runners=30 + n, seed=n) for n in range(3)]
    warehouse = s3_store.bucket("shared") + "/warehouse"
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    # The tables exist first, as after any earlier sync: the race is between commits.
    first = iceberg.IcebergTarget(catalog_uri, warehouse, "setup", s3_store.endpoint)
    catalog = iceberg.load_catalog(first)
    for name in iceberg.TABLES:
        iceberg.ensure_table(catalog, name)
    procs = [
        start_cli(
            "--debug",
            "sync",
            "--base-url",
            upstream.url,
            "--db",
            f"account{n}.db",
            "--no-export",
            "--iceberg",
            catalog_uri,
            "--iceberg-warehouse",
            warehouse,
            "--iceberg-account",
            f"account{n}",
            "--s3-endpoint-url",
            s3_store.endpoint,
            env=sync_env(s3_store, upstream),
        )
        for n, upstream in enumerate(upstreams)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        assert "Iceberg tables not updated" not in stderr, stderr

    runners = catalog.load_table("comfysync.runners").scan().to_arrow()
    counts = duckdb.sql("SELECT account, count(*) FROM runners GROUP BY ALL ORDER BY 1").fetchall()
    assert counts == [("account0", 30), ("account1", 31), ("account2", 32)]
    assert len(runners) == 93
    runs = catalog.load_table("comfysync.sync_runs").scan().to_arrow()
    assert sorted(runs.column("account").to_pylist()) == ["account0", "account1", "account2"]
    versions = catalog.load_table("comfysync.runner_versions").scan().to_arrow()
    assert len(versions) == 93
    table = catalog.load_table("comfysync.runners")
    assert all(sync_snapshot(table, f"account{n}", 1) for n in range(3))


def test_committers_that_collide_retry_until_every_one_lands(
    s3_store, serve_account, tmp_path, caplog
):
    """Three committers released at the same instant: all but one lose the first race."""
    import threading

    warehouse = s3_store.bucket("race") + "/warehouse"
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    synced = []
    for n in range(3):
        upstream = serve_account(runners=20 + n, seed=40 + n)
        db_path = tmp_path / f"account{n}.db"
        summary = run_sync(settings_for(upstream, db_path))
        synced.append((db_path, summary.sync_id, finished_at(db_path, summary.sync_id)))
    targets = [
        iceberg.IcebergTarget(catalog_uri, warehouse, f"account{n}", s3_store.endpoint)
        for n in range(3)
    ]
    catalog = iceberg.load_catalog(targets[0])
    for name in iceberg.TABLES:
        iceberg.ensure_table(catalog, name)
    start = threading.Barrier(3)
    commits: dict[int, iceberg.IcebergCommit] = {}

    def commit(n: int) -> None:
        from pipeline.store import schema

        db = schema.open_store_read_only(synced[n][0])
        start.wait()
        commits[n] = iceberg.commit_sync(
            db, targets[n], sync_id=synced[n][1], finished_at=synced[n][2]
        )
        db.close()

    caplog.set_level(logging.DEBUG, logger="pipeline.outputs.iceberg")
    caplog.set_level(logging.WARNING, logger="pyiceberg")
    threads = [threading.Thread(target=commit, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert {n: c.error for n, c in commits.items()} == {0: None, 1: None, 2: None}
    # The commits did collide (pyiceberg retries first, then pipeline.outputs.iceberg).
    assert any(
        "concurrent update" in r.getMessage() or "lost a race" in r.getMessage()
        for r in caplog.records
    )
    landed = catalog.load_table("comfysync.runners").scan().to_arrow()
    counts = duckdb.sql("SELECT account, count(*) FROM landed GROUP BY ALL ORDER BY 1").fetchall()
    assert len(landed) == 63
    assert counts == [("account0", 20), ("account1", 21), ("account2", 22)]


def test_a_config_file_sends_every_account_to_the_bucket_and_the_shared_tables(
    s3_store, serve_account, run_cli, tmp_path
):
    """The config file's keys are the options' names: export_dir, s3_endpoint_url, iceberg."""
    prod = serve_account(runners=12, seed=31, token="prod-token", user_id="owner-prod")
    staging = serve_account(runners=9, seed=32, token="staging-token", user_id="owner-staging")
    bucket = s3_store.bucket("configured")
    (tmp_path / "comfysync.toml").write_text(
        f"""
[defaults]
export_dir = "{bucket}/exports"
s3_endpoint_url = "{s3_store.endpoint}"
format = "parquet"
iceberg = "sqlite:///{tmp_path / "catalog.db"}"
iceberg_warehouse = "{bucket}/warehouse"

[accounts.prod]
base_url = "{prod.url}"
token_env = "TOKEN_PROD"

[accounts.staging]
base_url = "{staging.url}"
token_env = "TOKEN_STAGING"
"""
    )
    env = {**s3_store.env, "TOKEN_PROD": "prod-token", "TOKEN_STAGING": "staging-token"}
    result = run_cli("sync", "--all", env=env)
    assert result.exit_code == 0, result.stderr
    assert "iceberg: committed rows: runners 12, runner_versions 12, sync_runs 1" in result.stdout

    # The snapshots in each account's partition of the bucket, read as one dataset.
    duck = duckdb.connect()
    duck.register(
        "snapshots",
        ds.dataset(
            "configured/exports/parquet/runners",
            filesystem=s3_store.filesystem(),
            partitioning="hive",
        ),
    )
    found = duck.sql("SELECT account, count(*) FROM snapshots GROUP BY ALL ORDER BY 1").fetchall()
    assert found == [("prod", 12), ("staging", 9)]
    # The account's name is its rows' account in the shared tables.
    catalog = iceberg.load_catalog(
        iceberg.IcebergTarget(
            f"sqlite:///{tmp_path / 'catalog.db'}", f"{bucket}/warehouse", "-", s3_store.endpoint
        )
    )
    duck.register("runners", catalog.load_table("comfysync.runners").scan().to_arrow())
    counts = duck.sql("SELECT account, count(*) FROM runners GROUP BY ALL ORDER BY 1").fetchall()
    assert counts == [("prod", 12), ("staging", 9)]
    status = run_cli("status", "--account", "staging", "--json", env=env)
    assert status.exit_code == 0, status.stderr
    [staging_status] = json.loads(status.stdout)
    assert staging_status["account"] == "staging"
    assert staging_status["snapshots"]["files"] == 1


def test_lake_options_that_could_only_fail_later_are_refused_before_the_sync(
    serve_account, run_cli, tmp_path
):
    upstream = serve_account(runners=3, seed=1)
    base = ("sync", "--base-url", upstream.url, "--token", "test-token", "--db", "m.db")
    for extra, message in (
        (
            ("--iceberg", "data/catalog.db"),
            "comfysync: error: --iceberg 'data/catalog.db' is not a catalog URI; pass e.g. "
            "sqlite:///data/catalog.db or a REST catalog's https:// URL",
        ),
        (
            ("--iceberg", "sqlite:///c.db", "--iceberg-account", "team a"),
            "comfysync: error: Invalid value for --iceberg-account: 'team a': a name is "
            "1-64 letters, digits, '-' or '_' (see 'comfysync sync --help')",
        ),
    ):
        result = run_cli(*base, *extra)
        assert (result.exit_code, result.stderr.strip()) == (2, message)
    nobucket = run_cli(*base, "--export-dir", "s3://")
    assert nobucket.exit_code == 2
    assert "s3:// names no bucket and prefix (s3://bucket/prefix)" in nobucket.stderr
    assert not (tmp_path / "m.db").exists()


def test_a_recreated_database_replaces_its_accounts_rows_instead_of_skipping_them(
    serve_account, tmp_path
):
    upstream = serve_account(runners=40, seed=8)
    catalog_uri = f"sqlite:///{tmp_path / 'catalog.db'}"
    warehouse = str(tmp_path / "warehouse")
    old = iceberg_settings(
        upstream, tmp_path / "old.db", catalog_uri, warehouse, iceberg_account="a"
    )
    for step in range(3):
        run_sync(old)
        churn(upstream.account, step)
    # A new database for the same account (lost, or started afresh): its sync ids restart.
    new = iceberg_settings(
        upstream, tmp_path / "new.db", catalog_uri, warehouse, iceberg_account="a"
    )
    summary = run_sync(new)
    assert summary.sync_id == 1 and summary.warnings == ()
    catalog = iceberg.load_catalog(
        iceberg.IcebergTarget(catalog_uri, iceberg.default_warehouse(tmp_path, warehouse), "a")
    )
    versions = catalog.load_table("comfysync.runner_versions").scan().to_arrow()
    assert sorted(
        parquet_rows(versions.drop_columns(["account"])),
        key=lambda r: (r["runner_id"], r["version"]),
    ) == store_history(tmp_path / "new.db")
    runs = catalog.load_table("comfysync.sync_runs").scan().to_arrow()
    assert runs.column("id").to_pylist() == [1]
    runners = catalog.load_table("comfysync.runners").scan().to_arrow()
    assert len(runners) == len(
        store_fleet(tmp_path / "new.db", sync_id=1, snapshot_at=finished_at(tmp_path / "new.db", 1))
    )
