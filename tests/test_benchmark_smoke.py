"""The performance benchmark runs from its documented command (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

CASES = {
    "floor", "cold", "warm", "churn", "cold_200", "export", "floor_latency_c1",
    "floor_latency_c4", "cold_latency_c1", "cold_latency_c4", "help", "sync_help",
}


def test_the_sync_benchmark_runs_at_a_small_size_and_writes_its_figures(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sync", "--runners", "2000", "--repeat", "1",
         "--latency-ms", "5", "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = list(tmp_path.glob("sync-2000-*.json"))
    report = json.loads(written.read_text())
    assert set(report["cases"]) == CASES
    for name, figures in report["cases"].items():
        assert len(figures["runs"]) == 1 and figures["median_seconds"] > 0, name
        assert figures["peak_rss_mb"] > 0, name
    assert {t["target"] for t in report["targets"]} >= {
        "cold <= 2.5x floor", "warm <= 1.3x floor", "churn <= 1.4x floor",
        "sync peak RSS <= 300 MB", "export peak RSS <= 400 MB",
    }
    assert "case" in proc.stdout and "x floor" in proc.stdout  # the printed table
