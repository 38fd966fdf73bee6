"""The exports page is true: its column tables are the Parquet schemas, in order; and the demo
writes the snapshot series the analysis page reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow as pa
from conftest import REPO

from pipeline.outputs.export import FLEET_SCHEMA, HISTORY_SCHEMA

EXPORTS_PAGE = (REPO / "docs" / "exports.md").read_text()


def documented_columns(heading_text: str) -> list[tuple[str, str]]:
    """(column, Parquet type) of the first table after ``heading_text`` on the exports page."""
    after = EXPORTS_PAGE[EXPORTS_PAGE.index(heading_text) :]
    table = after[after.index("\n|") : after.index("\n\n", after.index("\n|"))]
    return re.findall(r"^\| \d+ \| `([a-z_]+)` \| `([^`]+)` \|", table, flags=re.MULTILINE)


def arrow_columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type).replace("list<item: string>", "list<string>")) for f in schema]


def test_the_exports_page_documents_the_export_columns_in_order_with_their_parquet_types():
    assert documented_columns("## Columns") == arrow_columns(FLEET_SCHEMA)
    assert documented_columns("`comfysync export --history` has one row") == arrow_columns(
        HISTORY_SCHEMA
    )


def test_the_demo_writes_its_own_snapshot_series_and_says_where(run_cli, tmp_path):
    result = run_cli("demo")
    assert result.exit_code == 0, result.stderr
    exports = tmp_path / "data" / "exports" / "demo"
    files = sorted(p.relative_to(exports).as_posix() for p in exports.rglob("*") if p.is_file())
    assert [re.sub(r"snapshot_date=[0-9-]+", "snapshot_date=D", f) for f in files] == [
        "csv/runners/snapshot_date=D/runners-1.csv",
        "csv/runners/snapshot_date=D/runners-2.csv",
        "parquet/runners/snapshot_date=D/runners-1.parquet",
        "parquet/runners/snapshot_date=D/runners-2.parquet",
    ]
    out = result.stdout
    assert "under data/exports/demo:" in out
    for path in files:
        assert f"  data/exports/demo/{path}  (250 rows)" in out
    assert "RunnerStore('data/demo.db').runners()" in out
    assert not (tmp_path / "data" / "exports" / "parquet").exists()  # a real mirror's tree


def test_the_export_benchmark_runs_at_a_tiny_size(tmp_path):
    result = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.export", "--runners", "500", "--repeat", "1"),
            *("--results-dir", str(tmp_path / "results"), "--workdir", str(tmp_path / "work")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    [path] = (tmp_path / "results").glob("export-500-*.json")
    figures = json.loads(path.read_text())
    assert figures["runners"] == 500
    assert [case["case"] for case in figures["cases"]] == ["parquet", "csv", "parquet+csv"]
    assert [case["rows"] for case in figures["cases"]] == [
        {"parquet": 500},
        {"csv": 500},
        {"parquet": 500, "csv": 500},
    ]
    assert all(case["peak_rss_mib"] >= case["baseline_rss_mib"] > 0 for case in figures["cases"])
    assert "parquet+csv" in result.stdout and str(path) in result.stdout
