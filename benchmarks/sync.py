"""Measure comfysync against the raw floor, as whole processes, in one interleaved run.

    python -m benchmarks.sync --runners 100000            # the full run (about 10 minutes)
    python -m benchmarks.sync --runners 2000 --repeat 1   # a smoke run (CI does this)

The simulator runs in separate processes on 127.0.0.1. Every case is a fresh process whose wall
time and peak RSS (``os.wait4``) are recorded; the cases run interleaved (A B C A B C ...) after
one warm-up round, so a noisy neighbour slows all of them alike, and each is reported as a ratio
to the floor measured in the same run. Figures go to ``benchmarks/results/`` as JSON. Nothing here
asserts a timing: the targets are printed as PASS/MISS for a human to read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-token"


@dataclass
class Measurement:
    seconds: float
    peak_rss_mb: float


@dataclass
class Case:
    """One whole-process measurement: ``prepare`` runs untimed before each repetition."""

    name: str
    command: Callable[[], list[str]]
    prepare: Callable[[], None] = lambda: None
    runs: list[Measurement] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return max(run.peak_rss_mb for run in self.runs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def simulator(runners: int, *, latency_ms: float = 0.0, churn: bool = False) -> Iterator[str]:
    """A simulator process on a free loopback port; yields its base URL; always stopped."""
    port = free_port()
    command = [
        sys.executable, "-m", "benchmarks.simserver", "--runners", str(runners),
        "--port", str(port), "--token", TOKEN, "--latency-ms", str(latency_ms),
    ]
    if churn:
        command += [
            "--updates", str(runners // 100), "--creates", str(runners // 1000),
            "--deletes", str(runners // 1000),
        ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"simulator on port {port} did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def measure(command: list[str], env: dict[str, str]) -> Measurement:
    """Run a command to completion; its wall time and peak RSS (this child only)."""
    with tempfile.TemporaryFile() as output:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            output.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{output.read().decode()[-2000:]}")
    return Measurement(seconds=seconds, peak_rss_mb=usage.ru_maxrss / 1024)


def comfysync(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def floor(base_url: str, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "benchmarks.floor", "--base-url", base_url,
        "--token", TOKEN, "--concurrency", str(concurrency),
    ]


def sync_args(base_url: str, db: Path, concurrency: int = 4) -> list[str]:
    return comfysync(
        "sync", "--base-url", base_url, "--db", str(db), "--concurrency", str(concurrency),
        *no_export_flag(),
    )


def no_export_flag() -> list[str]:
    """``--no-export`` where this comfysync exports snapshots after a sync."""
    help_text = subprocess.run(
        comfysync("sync", "--help"), capture_output=True, text=True, check=True
    ).stdout
    return ["--no-export"] if "--no-export" in help_text else []


def export_args(db: Path, folder: Path) -> list[str]:
    """One Parquet + CSV snapshot of the store, as a sync writes it (benchmarks.export)."""
    return [
        sys.executable, "-m", "benchmarks.export", "--child", "parquet+csv",
        "--db", str(db), "--out", str(folder),
    ]


def emptied(folder: Path) -> Callable[[], None]:
    def empty() -> None:
        shutil.rmtree(folder, ignore_errors=True)

    return empty


def fresh(db: Path) -> Callable[[], None]:
    def remove() -> None:
        for suffix in ("", "-journal", "-wal", "-shm", ".lock", ".key"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    return remove


def copy_of(source: Path, db: Path) -> Callable[[], None]:
    def copy() -> None:
        fresh(db)()
        shutil.copyfile(source, db)
        shutil.copy(f"{source}.key", f"{db}.key")  # the key the copy's rows were made under

    return copy


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "COMFYCONTROL_TOKEN": TOKEN}
    work = Path(tempfile.mkdtemp(prefix="comfysync-bench-"))
    small = max(1, args.runners // 10)
    try:
        with (
            simulator(args.runners) as plain,
            simulator(args.runners, churn=True) as churned,
            simulator(args.runners, latency_ms=args.latency_ms) as slow,
            simulator(small) as small_plain,
        ):
            base = work / "base.db"
            measure(sync_args(plain, base), env)  # the store warm and churn start from
            cases = [
                Case("floor", lambda: floor(plain, 4)),
                Case("cold", lambda: sync_args(plain, work / "cold.db"), fresh(work / "cold.db")),
                Case("warm", lambda: sync_args(plain, work / "warm.db"),
                     copy_of(base, work / "warm.db")),
                Case("churn", lambda: sync_args(churned, work / "churn.db"),
                     copy_of(base, work / "churn.db")),
                Case(f"cold_{small}", lambda: sync_args(small_plain, work / "small.db"),
                     fresh(work / "small.db")),
                Case("export", lambda: export_args(base, work / "exported"),
                     emptied(work / "exported")),
                Case("floor_latency_c1", lambda: floor(slow, 1)),
                Case("floor_latency_c4", lambda: floor(slow, 4)),
                Case("cold_latency_c1", lambda: sync_args(slow, work / "l1.db", 1),
                     fresh(work / "l1.db")),
                Case("cold_latency_c4", lambda: sync_args(slow, work / "l4.db", 4),
                     fresh(work / "l4.db")),
                Case("help", lambda: comfysync("--help")),
                Case("sync_help", lambda: comfysync("sync", "--help")),
            ]
            for round_number in range(args.repeat + 1):  # round 0 is the warm-up
                for case in cases:
                    case.prepare()
                    result = measure(case.command(), env)
                    if round_number > 0:
                        case.runs.append(result)
                    print(f"  round {round_number} {case.name:<18} {result.seconds:7.3f} s "
                          f"{result.peak_rss_mb:7.1f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarise(cases, args, small)


def summarise(cases: list[Case], args: argparse.Namespace, small: int) -> dict[str, object]:
    by_name = {case.name: case for case in cases}

    def median(name: str) -> float:
        return by_name[name].median_seconds

    growth = (median("cold") / args.runners) / (median(f"cold_{small}") / small)
    targets = [
        ("cold <= 2.5x floor", median("cold") / median("floor"), 2.5),
        ("warm <= 1.3x floor", median("warm") / median("floor"), 1.3),
        ("churn <= 1.4x floor", median("churn") / median("floor"), 1.4),
        ("latency cold c4 <= 1.5x floor c4",
         median("cold_latency_c4") / median("floor_latency_c4"), 1.5),
        ("latency cold c4 <= 0.45x floor c1",
         median("cold_latency_c4") / median("floor_latency_c1"), 0.45),
        ("sync peak RSS <= 300 MB", max(by_name[n].peak_rss_mb for n in ("cold", "warm", "churn")),
         300.0),
        ("export peak RSS <= 400 MB", by_name["export"].peak_rss_mb, 400.0),
        ("--help < 0.3 s", median("help"), 0.3),
        ("sync --help < 0.3 s", median("sync_help"), 0.3),
        (f"cold per runner at {args.runners} <= 1.2x at {small}", growth, 1.2),
    ]
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runners": args.runners,
        "repeat": args.repeat,
        "latency_ms": args.latency_ms,
        "cpus": os.cpu_count(),
        "cases": {
            case.name: {
                "median_seconds": round(case.median_seconds, 4),
                "ratio_to_floor": round(case.median_seconds / median("floor"), 3),
                "peak_rss_mb": round(case.peak_rss_mb, 1),
                "runs": [asdict(run) for run in case.runs],
            }
            for case in cases
        },
        "targets": [
            {"target": name, "value": round(value, 3), "limit": limit, "met": value <= limit}
            for name, value, limit in targets
        ],
    }


def print_report(report: dict[str, object]) -> None:
    cases = report["cases"]
    assert isinstance(cases, dict)
    print(f"comfysync benchmark: {report['runners']} runners, median of {report['repeat']} "
          f"run(s), {report['cpus']} CPUs, latency cases at {report['latency_ms']} ms/request")
    print(f"{'case':<20} {'median s':>10} {'x floor':>8} {'peak RSS MB':>12}")
    for name, figures in cases.items():
        print(f"{name:<20} {figures['median_seconds']:>10.3f} {figures['ratio_to_floor']:>8.2f} "
              f"{figures['peak_rss_mb']:>12.1f}")
    print()
    targets = report["targets"]
    assert isinstance(targets, list)
    for target in targets:
        verdict = "PASS" if target["met"] else "MISS"
        print(f"{verdict}  {target['target']:<44} {target['value']:>9.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runners", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds after a warm-up")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    report = run_benchmark(args)
    print_report(report)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"sync-{args.runners}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nfigures written to {out}")


if __name__ == "__main__":
    main()
