"""Measure comfysync against the floors, as whole processes, in one interleaved run.

    python -m benchmarks.sync --runners 100000            # the full run (about 10 minutes)
    python -m benchmarks.sync --runners 1000000           # the large size, on demand
    python -m benchmarks.sync --runners 2000 --repeat 1   # a smoke run (CI does this)

The account is served on 127.0.0.1 by separate processes: by default ``benchmarks.pages``,
which renders every page once at start-up and answers with a lookup and a write, so that the
server's own cost does not hide the limit; ``--server simulator`` serves it with the Starlette
simulator (``benchmarks.simserver``) instead, as the measurements before issue 16 did. Every
case is a fresh process whose wall time and peak RSS (``os.wait4``) are recorded; the cases run
interleaved (A B C A B C ...) after one warm-up round, so a noisy neighbour slows all of them
alike, and each is reported as a ratio to two floors measured in the same run: the httpx floor
(``benchmarks.floor``: fetch and parse every page) and the bare-wire floor (``benchmarks.wire``:
every page's bytes over one socket, unparsed). Figures go to ``benchmarks/results/`` as JSON.
Nothing here asserts a timing: the targets are printed as PASS/MISS for a human to read.

From ``LARGE_RUNNERS`` runners on, the run is the large plan: only the floors and the cold and
warm syncs (``--no-export`` and the default command), at N and at N/10 in the same run, so that
the growth of time per runner is a ratio measured side by side; ``--repeat`` defaults to 1.
"""

from __future__ import annotations

import argparse
import functools
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
LARGE_RUNNERS = 500_000
SERVERS = {"pages": "benchmarks.pages", "simulator": "benchmarks.simserver"}


@dataclass
class Measurement:
    seconds: float
    peak_rss_mb: float


@dataclass
class Case:
    """One whole-process measurement: ``prepare`` runs untimed before each repetition.

    ``floors`` names the httpx and bare-wire floor cases its ratios are taken to; ``syncs``
    marks a ``comfysync sync`` (the memory target covers every one of them).
    """

    name: str
    command: Callable[[], list[str]]
    prepare: Callable[[], None] = lambda: None
    floors: tuple[str, str] = ("floor", "wire")
    syncs: bool = False
    runs: list[Measurement] = field(default_factory=list)

    @property
    def median_seconds(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    @property
    def peak_rss_mb(self) -> float:
        return max(run.peak_rss_mb for run in self.runs)


@dataclass(frozen=True)
class Upstream:
    """One account to serve: its size, its added latency, and whether it is pre-churned."""

    runners: int
    latency_ms: float = 0.0
    churn: bool = False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(server: str, upstream: Upstream, port: int) -> list[str]:
    """The command serving ``upstream`` on ``port``; both servers take the same options."""
    command = [
        sys.executable, "-m", SERVERS[server], "--runners", str(upstream.runners),
        "--port", str(port), "--token", TOKEN, "--latency-ms", str(upstream.latency_ms),
    ]
    if upstream.churn:
        runners = upstream.runners
        command += [
            "--updates", str(runners // 100), "--creates", str(runners // 1000),
            "--deletes", str(runners // 1000),
        ]
    return command


@contextmanager
def serving(server: str, upstreams: dict[str, Upstream]) -> Iterator[dict[str, str]]:
    """One server process per upstream, started together; yields their base URLs by name.

    They build their accounts side by side and are all stopped on the way out.
    """
    ports = {name: free_port() for name in upstreams}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, upstream in upstreams.items():
            command = server_command(server, upstream, ports[name])
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        largest = max(upstream.runners for upstream in upstreams.values())
        deadline = time.monotonic() + 120 + largest / 2_000  # a big account takes a while
        for proc, port in zip(procs, ports.values(), strict=True):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{server} on port {port} did not start") from None
                    time.sleep(0.1)
        yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
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


def wire(base_url: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.wire", "--base-url", base_url, "--token", TOKEN]


def sync_args(base_url: str, db: Path, concurrency: int = 4) -> list[str]:
    """``comfysync sync --no-export``: the sync alone, as measured before issue 16."""
    return comfysync(
        "sync", "--base-url", base_url, "--db", str(db), "--concurrency", str(concurrency),
        *no_export_flag(),
    )


def default_sync_args(base_url: str, db: Path, exports: Path) -> list[str]:
    """``comfysync sync`` as users run it: the sync, then its snapshots in default formats."""
    return comfysync(
        "sync", "--base-url", base_url, "--db", str(db), "--concurrency", "4",
        "--export-dir", str(exports),
    )


@functools.cache
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


def fresh(db: Path, exports: Path | None = None) -> Callable[[], None]:
    """No database (and no export folder, if given): what a first sync starts from."""

    def remove() -> None:
        for suffix in ("", "-journal", "-wal", "-shm", ".lock", ".key"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        if exports is not None:
            shutil.rmtree(exports, ignore_errors=True)

    return remove


def copy_of(
    source: Path, db: Path, *, exports: tuple[Path, Path] | None = None
) -> Callable[[], None]:
    """The base store (and its export folder, copied to the case's own): a later sync's start."""

    def copy() -> None:
        fresh(db, exports[1] if exports else None)()
        shutil.copyfile(source, db)
        shutil.copy(f"{source}.key", f"{db}.key")  # the key the copy's rows were made under
        if exports is not None:
            # Linked, not copied: snapshot files are only ever replaced whole, never changed
            # in place, and a copy's dirty pages would be written back during the timed run.
            shutil.copytree(*exports, copy_function=os.link)
        os.sync()  # nor should the database copy's

    return copy


def full_plan(
    urls: dict[str, str], work: Path, small: int
) -> tuple[list[Case], list[tuple[Path, Path, str]]]:
    """Every case at the benchmark's size; and the base stores to sync before measuring."""
    plain, churned, slow = urls["plain"], urls["churned"], urls["slow"]
    base, base_exports = work / "base.db", work / "base-exports"

    def default_case(name: str, url: str, from_base: bool) -> Case:
        db, exports = work / f"{name}.db", work / f"{name}-exports"
        prepare = (copy_of(base, db, exports=(base_exports, exports)) if from_base
                   else fresh(db, exports))
        return Case(name, lambda: default_sync_args(url, db, exports), prepare, syncs=True)

    cases = [
        Case("floor", lambda: floor(plain, 4)),
        Case("wire", lambda: wire(plain)),
        Case("cold", lambda: sync_args(plain, work / "cold.db"), fresh(work / "cold.db"),
             syncs=True),
        Case("warm", lambda: sync_args(plain, work / "warm.db"),
             copy_of(base, work / "warm.db"), syncs=True),
        Case("churn", lambda: sync_args(churned, work / "churn.db"),
             copy_of(base, work / "churn.db"), syncs=True),
        default_case("default_cold", plain, from_base=False),
        default_case("default_warm", plain, from_base=True),
        default_case("default_churn", churned, from_base=True),
        Case(f"cold_{small}", lambda: sync_args(urls["small"], work / "small.db"),
             fresh(work / "small.db"), syncs=True),
        Case("export", lambda: export_args(base, work / "exported"),
             emptied(work / "exported")),
        Case("floor_latency_c1", lambda: floor(slow, 1)),
        Case("floor_latency_c4", lambda: floor(slow, 4)),
        Case("cold_latency_c1", lambda: sync_args(slow, work / "l1.db", 1),
             fresh(work / "l1.db"), syncs=True),
        Case("cold_latency_c4", lambda: sync_args(slow, work / "l4.db", 4),
             fresh(work / "l4.db"), syncs=True),
        Case("help", lambda: comfysync("--help")),
        Case("sync_help", lambda: comfysync("sync", "--help")),
    ]
    return cases, [(base, base_exports, plain)]


def large_plan(
    urls: dict[str, str], work: Path, small: int
) -> tuple[list[Case], list[tuple[Path, Path, str]]]:
    """The floors and the cold and warm syncs, at N and N/10 (suffixed ``_N/10``)."""
    cases: list[Case] = []
    bases: list[tuple[Path, Path, str]] = []
    for suffix, url in (("", urls["plain"]), (f"_{small}", urls["small"])):
        base, base_exports = work / f"base{suffix}.db", work / f"base{suffix}-exports"
        bases.append((base, base_exports, url))
        floors = (f"floor{suffix}", f"wire{suffix}")

        def no_export(name: str, prepare: Callable[[Path], Callable[[], None]],
                      url: str = url, floors: tuple[str, str] = floors) -> Case:
            db = work / f"{name}.db"
            return Case(name, lambda: sync_args(url, db), prepare(db), floors, syncs=True)

        def default(name: str, from_base: Path | None, base_exports: Path = base_exports,
                    url: str = url, floors: tuple[str, str] = floors) -> Case:
            db, exports = work / f"{name}.db", work / f"{name}-exports"
            prepare = (copy_of(from_base, db, exports=(base_exports, exports)) if from_base
                       else fresh(db, exports))
            return Case(name, lambda: default_sync_args(url, db, exports), prepare, floors,
                        syncs=True)

        cases += [
            Case(f"floor{suffix}", functools.partial(floor, url, 4), floors=floors),
            Case(f"wire{suffix}", functools.partial(wire, url), floors=floors),
            no_export(f"cold{suffix}", fresh),
            no_export(f"warm{suffix}", functools.partial(copy_of, base)),
            default(f"default_cold{suffix}", None),
            default(f"default_warm{suffix}", base),
        ]
    return cases, bases


def compile_bytecode() -> None:
    """Compile the checkout's modules first, as pip does for an installed package: otherwise,
    where ``PYTHONDONTWRITEBYTECODE`` is set, every measured process compiles them again."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(root / "pipeline"), str(root / "jobs")],
        check=True,
    )


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "COMFYCONTROL_TOKEN": TOKEN}
    compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="comfysync-bench-"))
    small = max(1, args.runners // 10)
    upstreams = {"plain": Upstream(args.runners), "small": Upstream(small)}
    if args.plan == "full":
        upstreams["churned"] = Upstream(args.runners, churn=True)
        upstreams["slow"] = Upstream(args.runners, latency_ms=args.latency_ms)
    try:
        with serving(args.server, upstreams) as urls:
            plan = full_plan if args.plan == "full" else large_plan
            cases, bases = plan(urls, work, small)
            for db, exports, url in bases:  # the stores warm and churn start from
                measure(default_sync_args(url, db, exports), env)
            for round_number in range(args.repeat + 1):  # round 0 is the warm-up
                for case in cases:
                    case.prepare()
                    result = measure(case.command(), env)
                    if round_number > 0:
                        case.runs.append(result)
                    print(f"  round {round_number} {case.name:<22} {result.seconds:7.3f} s "
                          f"{result.peak_rss_mb:7.1f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarise(cases, args, small)


Target = tuple[str, float, float]


def full_targets(by_name: dict[str, Case], runners: int, small: int) -> list[Target]:
    def median(name: str) -> float:
        return by_name[name].median_seconds

    growth = (median("cold") / runners) / (median(f"cold_{small}") / small)
    return [
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
        (f"cold per runner at {runners} <= 1.2x at {small}", growth, 1.2),
        ("default cold <= 2.5x floor", median("default_cold") / median("floor"), 2.5),
        ("default warm <= 1.0x floor", median("default_warm") / median("floor"), 1.0),
        ("default churn <= 1.4x floor", median("default_churn") / median("floor"), 1.4),
        ("every sync peak RSS <= 250 MB",
         max(case.peak_rss_mb for case in by_name.values() if case.syncs), 250.0),
    ]


def large_targets(by_name: dict[str, Case], runners: int, small: int) -> list[Target]:
    targets: list[Target] = []
    for name, limit in (("cold", 600.0), ("default_cold", 600.0), ("warm", 300.0),
                        ("default_warm", 300.0)):
        label = name.replace("_", " ")
        targets.append((f"{label} peak RSS <= {limit:.0f} MB", by_name[name].peak_rss_mb, limit))
    for name in ("cold", "warm", "default_cold", "default_warm"):
        growth = ((by_name[name].median_seconds / runners)
                  / (by_name[f"{name}_{small}"].median_seconds / small))
        label = name.replace("_", " ")
        targets.append((f"{label} per runner at {runners} <= 1.2x at {small}", growth, 1.2))
    return targets


def summarise(cases: list[Case], args: argparse.Namespace, small: int) -> dict[str, object]:
    by_name = {case.name: case for case in cases}
    plan_targets = full_targets if args.plan == "full" else large_targets

    def ratio(case: Case, floor_name: str) -> float:
        return round(case.median_seconds / by_name[floor_name].median_seconds, 3)

    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "runners": args.runners,
        "repeat": args.repeat,
        "plan": args.plan,
        "server": args.server,
        "latency_ms": args.latency_ms,
        "cpus": os.cpu_count(),
        "cases": {
            case.name: {
                "median_seconds": round(case.median_seconds, 4),
                "ratio_to_floor": ratio(case, case.floors[0]),
                "ratio_to_wire": ratio(case, case.floors[1]),
                "peak_rss_mb": round(case.peak_rss_mb, 1),
                "runs": [asdict(run) for run in case.runs],
            }
            for case in cases
        },
        "targets": [
            {"target": name, "value": round(value, 3), "limit": limit, "met": value <= limit}
            for name, value, limit in plan_targets(by_name, args.runners, small)
        ],
    }


def print_report(report: dict[str, object]) -> None:
    cases = report["cases"]
    assert isinstance(cases, dict)
    latency = (f", latency cases at {report['latency_ms']} ms/request"
               if report["plan"] == "full" else "")
    print(f"comfysync benchmark: {report['runners']} runners ({report['plan']} plan, "
          f"{report['server']} server), median of {report['repeat']} run(s), "
          f"{report['cpus']} CPUs{latency}")
    print(f"{'case':<24} {'median s':>10} {'x floor':>8} {'x wire':>8} {'peak RSS MB':>12}")
    for name, figures in cases.items():
        print(f"{name:<24} {figures['median_seconds']:>10.3f} {figures['ratio_to_floor']:>8.2f} "
              f"{figures['ratio_to_wire']:>8.2f} {figures['peak_rss_mb']:>12.1f}")
    print()
    targets = report["targets"]
    assert isinstance(targets, list)
    for target in targets:
        verdict = "PASS" if target["met"] else "MISS"
        print(f"{verdict}  {target['target']:<50} {target['value']:>9.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runners", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=None,
                        help="measured rounds after a warm-up (default 5; 1 for the large plan)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--server", choices=sorted(SERVERS), default="pages",
                        help="what serves the account: pre-rendered pages (default) or the "
                        "Starlette simulator (the measurements before issue 16)")
    parser.add_argument("--plan", choices=("full", "large"), default=None,
                        help=f"the cases to run (default: large from {LARGE_RUNNERS} runners)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.plan is None:
        args.plan = "large" if args.runners >= LARGE_RUNNERS else "full"
    if args.repeat is None:
        args.repeat = 1 if args.plan == "large" else 5
    report = run_benchmark(args)
    print_report(report)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"sync-{args.runners}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"\nfigures written to {out}")


if __name__ == "__main__":
    main()
