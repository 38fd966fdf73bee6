"""Shared fixtures: the simulator on a real loopback socket, databases, and the CLI as a process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline.simulator import LoopbackServer, SimulatedAccount

if TYPE_CHECKING:
    from mirror_fixture import Mirror

REPO = Path(__file__).resolve().parent.parent


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


def run_comfysync(
    cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> CliResult:
    """Run `comfysync` as a real subprocess in ``cwd``, with a clean environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
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


def cli_environment(env: dict[str, str] | None) -> dict[str, str]:
    """This environment without comfysync's variables, plus ``env``."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("COMFYCONTROL_", "COMFYSYNC_"))
    }
    environ.update(env or {})
    return environ


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


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {condition}")
        time.sleep(0.02)


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
