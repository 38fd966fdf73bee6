"""README's export documentation is true: the column tables, and every Python example after the demo."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pyarrow as pa
from conftest import REPO

from pipeline.outputs.export import FLEET_SCHEMA, HISTORY_SCHEMA

README = (REPO / "README.md").read_text()


def documented_columns(heading_text: str) -> list[tuple[str, str]]:
    """(column, Parquet type) of the first table after ``heading_text`` in README."""
    after = README[README.index(heading_text) :]
    table = after[after.index("\n|") : after.index("\n\n", after.index("\n|"))]
    return re.findall(r"^\| \d+ \| `([a-z_]+)` \| `([^`]+)` \|", table, flags=re.MULTILINE)


def arrow_columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type).replace("list<item: string>", "list<string>")) for f in schema]


def test_the_readme_documents_the_export_columns_in_order_with_their_parquet_types():
    assert documented_columns("### Columns") == arrow_columns(FLEET_SCHEMA)
    assert documented_columns("`comfysync export --history` has one row") == arrow_columns(
        HISTORY_SCHEMA
    )


def test_the_readme_python_examples_work_after_the_demo(run_cli, tmp_path):
    assert run_cli("demo").exit_code == 0
    examples = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    assert len(examples) == 3
    assert examples[0].strip().splitlines() == [
        "from pipeline import RunnerStore",
        'store = RunnerStore("data/demo.db")',
        'print(store.runners().groupby("status").size())',
    ]
    outputs = []
    for code in examples:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    by_status, series, csv_head = outputs
    counts = dict(re.findall(r"^(active|disabled)\s+(\d+)$", by_status, flags=re.MULTILINE))
    assert sum(map(int, counts.values())) == 250  # the demo's second sync: 250 present
    assert series.count("250") >= 4  # two snapshots of 250 runners, by pandas/pyarrow/DuckDB
    assert csv_head.split()[:1] == ["name"] and "updated_at" in csv_head.splitlines()[0]
    assert csv_head.count("+00:00") == 5  # timestamps parsed as UTC, one per row shown


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
