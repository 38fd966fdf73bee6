"""Shared fixtures: the simulator on a real loopback socket, databases, and the CLI as a process."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
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


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run `comfysync` as a real subprocess, in tmp_path, with a clean environment."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
        environ = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("COMFYCONTROL_", "COMFYSYNC_"))
        }
        environ.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", *args],
            cwd=tmp_path,
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


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
