"""Benchmark: snapshot export of a large store to Parquet and CSV.

    .venv/bin/python -m benchmarks.export --runners 100000

Builds a store of ``--runners`` runners by syncing the bundled simulator in process
(``httpx.ASGITransport``, no sockets), then measures the snapshot a sync writes after it
commits (``series.export_snapshots``, with no earlier file to patch), for Parquet alone, CSV
alone and both. The store is built, and each measurement runs, in a fresh child process of a
parent that imports nothing heavy, so that each peak resident memory (``ru_maxrss``, which
Linux carries across exec from the forking parent) is the export's own; the wall time
reported is the median of ``--repeat`` runs. Prints a table and writes the figures as JSON
under ``benchmarks/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CASES: dict[str, tuple[str, ...]] = {
    "parquet": ("parquet",),
    "csv": ("csv",),
    "parquet+csv": ("parquet", "csv"),
}
DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"


def build_store(db_path: Path, runners: int) -> float:
    """Sync a simulated account of ``runners`` runners into ``db_path``; returns seconds."""
    import httpx

    from pipeline.settings import Settings
    from pipeline.sim.simulator import SimulatedAccount, create_app
    from pipeline.sync.run import run_sync

    account = SimulatedAccount(runners=runners, seed=1, token="bench-token")
    settings = Settings(
        base_url="http://127.0.0.1", token="bench-token", db_path=db_path, concurrency=8
    )
    started = time.perf_counter()
    summary = run_sync(settings, transport=httpx.ASGITransport(app=create_app(account)))
    if summary.status != "success" or summary.created != runners:
        raise RuntimeError(f"the store was not built: {summary}")
    return time.perf_counter() - started


def _max_rss_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def build_in_child(db_path: Path, runners: int) -> dict[str, Any]:
    """Build the store (in this child process) and say how long it took and how big it is."""
    import pyarrow

    seconds = build_store(db_path, runners)
    return {
        "store_build_seconds": round(seconds, 2),
        "store_mib": round(db_path.stat().st_size / 2**20, 1),
        "pyarrow": pyarrow.__version__,
    }


def measure_once(db_path: Path, case: str, out_dir: Path) -> dict[str, Any]:
    """One snapshot export of the store's latest sync (runs in the child process)."""
    from pipeline.outputs import series
    from pipeline.read import history
    from pipeline.store import schema

    db = schema.open_store_read_only(db_path)
    applied = history.last_applied_sync(db)
    if applied is None:
        raise RuntimeError("the store has no applied sync")
    baseline_mib = _max_rss_mib()
    started = time.perf_counter()
    report = series.export_snapshots(
        out_dir,
        sync_id=applied.sync_id,
        snapshot_at=applied.finished_at,
        db=db,
        formats=CASES[case],
    )
    seconds = time.perf_counter() - started
    peak_mib = _max_rss_mib()
    db.close()
    errors = [f.error for f in report.files if f.error]
    if errors:
        raise RuntimeError("; ".join(str(e) for e in errors))
    return {
        "seconds": seconds,
        "rows": {f.format: f.rows for f in report.files},
        "bytes": {f.format: f.bytes for f in report.files},
        "baseline_rss_mib": baseline_mib,
        "peak_rss_mib": peak_mib,
    }


def child(*arguments: str) -> dict[str, Any]:
    """Run this module in a child process and return the JSON object it prints last."""
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks.export", *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child {arguments} failed:\n{process.stderr}")
    result: dict[str, Any] = json.loads(process.stdout.splitlines()[-1])
    return result


def measure(db_path: Path, case: str, repeat: int, work: Path) -> dict[str, Any]:
    runs = [
        child("--child", case, "--db", str(db_path), "--out", str(work / f"{case}-{attempt}"))
        for attempt in range(repeat)
    ]
    return {
        "case": case,
        "seconds": [round(r["seconds"], 4) for r in runs],
        "median_seconds": round(statistics.median(r["seconds"] for r in runs), 4),
        "rows": runs[0]["rows"],
        "bytes": runs[0]["bytes"],
        "baseline_rss_mib": round(max(r["baseline_rss_mib"] for r in runs), 1),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"export benchmark: {results['runners']:,} runners, median of {results['repeat']} run(s); "
        f"store built in {results['store_build_seconds']:.1f} s "
        f"({results['store_mib']:.1f} MiB)",
        f"{'case':<13}{'median s':>10}{'rows':>10}{'file MiB':>22}{'peak RSS MiB':>15}"
        f"{'(baseline)':>12}",
    ]
    for case in results["cases"]:
        sizes = " + ".join(f"{b / 2**20:.1f}" for b in case["bytes"].values())
        rows = max(case["rows"].values())
        lines.append(
            f"{case['case']:<13}{case['median_seconds']:>10.2f}{rows:>10,}{sizes:>22}"
            f"{case['peak_rss_mib']:>15.0f}{case['baseline_rss_mib']:>12.0f}"
        )
    return "\n".join(lines)


def run(runners: int, repeat: int, results_dir: Path, work: Path) -> Path:
    db_path = work / "bench.db"
    built = child("--build", str(runners), "--db", str(db_path))
    results: dict[str, Any] = {
        "benchmark": "export",
        "runners": runners,
        "repeat": repeat,
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        **built,
        "cases": [measure(db_path, case, repeat, work) for case in CASES],
    }
    print(table(results))
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = results_dir / f"export-{runners}-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__)
    parser.add_argument("--runners", type=int, default=100_000, help="runners in the store")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS, help="JSON goes here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the store and files here")
    parser.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--build", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_once(args.db, args.child, args.out)))
        return
    if args.build is not None:
        print(json.dumps(build_in_child(args.db, args.build)))
        return
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.runners, args.repeat, args.results_dir, args.workdir)
        return
    with tempfile.TemporaryDirectory(prefix="comfysync-bench-") as work:
        run(args.runners, args.repeat, args.results_dir, Path(work))


if __name__ == "__main__":
    main()
