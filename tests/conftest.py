"""Shared fixtures: the simulator on a real loopback socket, databases, and the CLI as a process."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from hypothesis import HealthCheck, settings

from pipeline.sim.simulator import LoopbackServer, SimulatedAccount

if TYPE_CHECKING:
    from mirror_fixture import Mirror

REPO = Path(__file__).resolve().parent.parent

# Property tests (tests/test_properties.py). "ci" is the default, sized for a minute or two;
# `pytest --hypothesis-profile=thorough tests/test_properties.py` runs the long search.
_UNHURRIED = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=200, stateful_step_count=30, **_UNHURRIED)
settings.register_profile("thorough", max_examples=1000, stateful_step_count=60, **_UNHURRIED)
settings.load_profile("ci")


@dataclass
class Upstream:
    """A simulated account served on 127.0.0.1, and its URL."""

    account: SimulatedAccount
    server: LoopbackServer

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture
def serve_account() -> Iterator[Callable[..., Upstream]]:
    """Start simulators on free loopback ports; every one is stopped after the test."""
    servers: list[LoopbackServer] = []

    def start(**options: object) -> Upstream:
        options.setdefault("token", "test-token")
        account = SimulatedAccount(**options)  # type: ignore[arg-type]
        server = LoopbackServer(account)
        server.__enter__()
        servers.append(server)
        return Upstream(account, server)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "mirror.db"


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def cli_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any comfysync setting, plus ``extra``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMFYCONTROL_", "COMFYSYNC_"))
    }
    environ.update(extra or {})
    return environ


def run_comfysync(
    folder: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> CliResult:
    """Run `comfysync *args` as a real subprocess in ``folder``, with a clean environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=folder,
        env=cli_environment(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run `comfysync` as a real subprocess, in tmp_path, with a clean environment."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        return run_comfysync(tmp_path, *args, env=env, timeout=timeout)

    return run


@pytest.fixture
def start_cli(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `comfysync` as a background process in tmp_path; any still running are killed."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=tmp_path,
            env=cli_environment(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def get_once_served(proc: subprocess.Popen[str], url: str, timeout: float = 30) -> httpx.Response:
    """GET ``url`` from the server ``proc`` is starting, retrying until it answers.

    Fails the test if ``proc`` exits first or nothing answers within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=5)
        except httpx.TransportError:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"nothing answered {url} in {timeout} s"
            time.sleep(0.1)


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(0.02)


_ANNOUNCED_URL = re.compile(r"simulating \d+ runners on (http://\S+)/v1/runner")


@dataclass
class SimulatorProcess:
    """`comfysync simulate --port 0` running as a real process; its output goes to files."""

    process: subprocess.Popen[bytes]
    url: str
    stdout_path: Path
    stderr_path: Path

    def stop(self) -> CliResult:
        """Ctrl+C it (SIGINT), wait for it, and return everything it printed (idempotent)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return CliResult(
            self.process.returncode, self.stdout_path.read_text(), self.stderr_path.read_text()
        )

    def wait_until_listening(self, timeout: float = 30) -> str:
        """Wait for the line announcing the URL (with the real port) and return the URL."""
        deadline = time.monotonic() + timeout
        while not (found := _ANNOUNCED_URL.search(self.stderr_path.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"simulate did not start: {self.stderr_path.read_text()}")
            time.sleep(0.02)
        self.url = found.group(1)
        return self.url

    def trace(self) -> list[str]:
        """The request lines `--debug` logged so far: what each request got, in order."""
        return [
            line.split(": DEBUG: ", 1)[1]
            for line in self.stderr_path.read_text().splitlines()
            if ": DEBUG: GET /v1/runner" in line
        ]


def spawn_simulator(
    folder: Path, *flags: str, env: dict[str, str] | None = None
) -> SimulatorProcess:
    """Start `comfysync simulate --port 0 *flags` in ``folder`` without waiting for it.

    Call ``wait_until_listening()`` before using ``url``; the caller must ``stop()`` it.
    """
    number = len(list(folder.glob("simulate-*.err")))
    stdout_path = folder / f"simulate-{number}.out"
    stderr_path = folder / f"simulate-{number}.err"
    with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "simulate", "--port", "0", *flags],
            cwd=folder,
            env=cli_environment(env),
            stdout=stdout,
            stderr=stderr,
        )
    return SimulatorProcess(process, "", stdout_path, stderr_path)


def start_simulator(
    folder: Path, *flags: str, env: dict[str, str] | None = None
) -> SimulatorProcess:
    """`spawn_simulator`, then wait until it listens."""
    simulator = spawn_simulator(folder, *flags, env=env)
    simulator.wait_until_listening()
    return simulator


@pytest.fixture
def run_simulator(tmp_path: Path) -> Iterator[Callable[..., SimulatorProcess]]:
    """Start `comfysync simulate --port 0 *flags` processes; every one is stopped after the test."""
    started: list[SimulatorProcess] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> SimulatorProcess:
        simulator = start_simulator(tmp_path, *flags, env=env)
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


def dump_except_run_log(path: Path) -> list[str]:
    """Every statement of the database but the run log's rows: 'unchanged apart from the log'."""
    conn = sqlite3.connect(path)
    try:
        return [line for line in conn.iterdump() if not line.startswith('INSERT INTO "sync_runs"')]
    finally:
        conn.close()


def rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return [tuple(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Mirror:
    """A database made by real syncs with known changes (see mirror_fixture); do not write to it."""
    from mirror_fixture import build_mirror

    return build_mirror(tmp_path_factory.mktemp("mirror") / "mirror.db")
