"""Shared fixtures and helpers: the simulator on a real loopback socket, databases, settings,
and the CLI as a process. Helpers more than one test file needs live here, once."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from hypothesis import HealthCheck, settings

from pipeline.settings import Settings
from pipeline.sim.simulator import LoopbackServer, SimulatedAccount
from pipeline.source.records import TRACKED_FIELDS, content_hash

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


@dataclass(frozen=True)
class Received:
    """One request a ``Receiver`` got."""

    method: str
    path: str
    body: bytes
    headers: dict[str, str]


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers ``status`` (200):
    what a webhook, a notification service or a ping monitor would be."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[Received] = []
        self.status = 200
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                receiver.requests.append(
                    Received(self.command, self.path, body, dict(self.headers.items()))
                )
                self.send_response(receiver.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = _record

            def log_message(self, *args: object) -> None:  # the test reads requests, not logs
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def posted_json(self, path: str) -> list[dict[str, Any]]:
        """The JSON bodies POSTed to ``path``, in order."""
        return [json.loads(r.body) for r in self.requests if r.method == "POST" and r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording HTTP receiver on 127.0.0.1, stopped after the test."""
    server = Receiver()
    yield server
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


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, as long as nobody binds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(upstream: Upstream, db_path: Path, **options: Any) -> Settings:
    """Settings that sync ``upstream`` into ``db_path``; retries wait little, so that a test
    meeting a failure is quick about it."""
    options.setdefault("retry_wait_initial", 0.05)
    options.setdefault("retry_wait_max", 0.2)
    return Settings(base_url=upstream.url, token=upstream.account.token, db_path=db_path, **options)


def key_file(db_path: Path) -> Path:
    """Where the store keeps its redaction key: beside the database (<db>.key)."""
    return db_path.with_name(db_path.name + ".key")


def redaction_key(db_path: Path) -> bytes:
    """The key the store redacts under, read from its key file."""
    return bytes.fromhex(key_file(db_path).read_text())


def expected_mirror(account: SimulatedAccount, key: bytes) -> dict[str, dict[str, object]]:
    """The simulator's runners as the store must hold them, computed independently."""

    def redact(value: str) -> str:
        return "redacted:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:12]

    mirror = {}
    for runner in account.list_runners():
        mirror[runner["id"]] = {
            "user_id": runner["user_id"],
            "name": runner["name"],
            "status": runner["status"],
            "endpoint": runner["endpoint"],
            "tags": runner["tags"],
            "headers": {name: redact(value) for name, value in runner["headers"].items()},
            "created_at": runner["created_at"],
            "updated_at": runner["updated_at"],
            "extra": {},
        }
    return mirror


def present_mirror(db_path: Path) -> dict[str, dict[str, object]]:
    """The runners the store holds as present, in the shape of ``expected_mirror``."""
    found = rows(
        db_path,
        "SELECT id, user_id, name, status, endpoint, tags, headers, created_at, updated_at, "
        "extra FROM runners WHERE deleted_at IS NULL",
    )
    mirror = {}
    for row in found:
        record = dict(zip(TRACKED_FIELDS, row[1:], strict=True))
        for name in ("tags", "headers", "extra"):
            record[name] = json.loads(str(record[name]))
        mirror[str(row[0])] = record
    return mirror


def check_history(db_path: Path) -> None:
    """Replaying each runner's versions gives its row; intervals touch end to end."""
    columns = ", ".join(TRACKED_FIELDS)
    current = {
        str(row[0]): row[1:]
        for row in rows(
            db_path,
            f"SELECT id, {columns}, first_seen_at, deleted_at, version, content_hash FROM runners",
        )
    }
    history: dict[str, list[tuple[object, ...]]] = {}
    for row in rows(
        db_path,
        f"SELECT runner_id, version, change, changed_fields, {columns}, content_hash, "
        "valid_from, valid_to FROM runner_versions ORDER BY runner_id, version",
    ):
        history.setdefault(str(row[0]), []).append(row[1:])
    assert set(history) == set(current)
    width = len(TRACKED_FIELDS)
    for runner_id, versions in history.items():
        state: tuple[object, ...] = ()
        deleted_at: object = None
        for number, version in enumerate(versions, start=1):
            (
                version_no, change, changed, *fields_and_rest,
            ) = version  # fmt: skip
            fields = tuple(fields_and_rest[:width])
            stored_hash, valid_from, valid_to = fields_and_rest[width:]
            assert version_no == number, (runner_id, versions)
            assert stored_hash == content_hash(tuple(str(f) for f in fields))
            if number == 1:
                assert change == "created"
            elif change == "deleted":
                assert deleted_at is None and fields == state and changed == "[]"
            elif change == "restored":
                assert deleted_at is not None
            else:
                assert change == "updated" and deleted_at is None
            if change in ("updated", "restored"):
                expected = [
                    n
                    for n, old, new in zip(TRACKED_FIELDS, state, fields, strict=True)
                    if old != new
                ]
                assert json.loads(str(changed)) == expected
                assert change == "restored" or expected
            deleted_at = valid_from if change == "deleted" else None
            state = fields
            if number < len(versions):
                assert valid_to == versions[number][-2]  # touches the next one's valid_from
                assert str(valid_from) <= str(valid_to)
            else:
                assert valid_to is None
        *row_fields, first_seen_at, row_deleted_at, row_version, row_hash = current[runner_id]
        assert tuple(row_fields) == state
        assert (first_seen_at, row_deleted_at) == (versions[0][-2], deleted_at)
        assert (row_version, row_hash) == (len(versions), versions[-1][-3])


def quietly(*command: str) -> bool:
    """Run ``command``; True if it succeeded, False if it failed or is not installed."""
    try:
        return subprocess.run(command, capture_output=True).returncode == 0
    except OSError:  # no such program
        return False


@contextmanager
def write_protected(path: Path) -> Iterator[None]:
    """Make ``path`` unwritable in a way root respects too."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if quietly("chattr", "+i", str(path)):
        try:
            yield
        finally:
            quietly("chattr", "-i", str(path))
        return
    if quietly("mount", "--bind", str(path), str(path)):
        try:
            if not quietly("mount", "-o", "remount,ro,bind", str(path), str(path)):
                pytest.fail(f"could not make {path} read-only: neither chattr +i nor a ro bind")
            yield
        finally:
            quietly("umount", str(path))
        return
    pytest.fail(f"as root, {path} cannot be write-protected here (no chattr +i, no mount)")


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Mirror:
    """A database made by real syncs with known changes (see mirror_fixture); do not write to it."""
    from mirror_fixture import build_mirror

    return build_mirror(tmp_path_factory.mktemp("mirror") / "mirror.db")


@dataclass(frozen=True)
class S3Store:
    """moto's S3 server on 127.0.0.1: a real S3 protocol endpoint, with made-up credentials."""

    endpoint: str
    env: dict[str, str]

    def bucket(self, name: str) -> str:
        """Create the bucket ``name`` and return its ``s3://`` URL."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_BOTO_CREDENTIALS)
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def filesystem(self) -> Any:
        """pyarrow's own S3 filesystem on the server, for reading back what was written."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=self.endpoint,
            access_key=_BOTO_CREDENTIALS["aws_access_key_id"],
            secret_key=_BOTO_CREDENTIALS["aws_secret_access_key"],
            region=_BOTO_CREDENTIALS["region_name"],
        )


_BOTO_CREDENTIALS = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_store() -> Iterator[S3Store]:
    """One moto S3 server for the session (tests each make their own bucket); the AWS
    variables point this process at it, as they would point comfysync at a real account."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": _BOTO_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": _BOTO_CREDENTIALS["aws_secret_access_key"],
        "AWS_DEFAULT_REGION": _BOTO_CREDENTIALS["region_name"],
        "AWS_REGION": _BOTO_CREDENTIALS["region_name"],
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield S3Store(f"http://127.0.0.1:{port}", env)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def churn(account: SimulatedAccount, step: int) -> None:
    """Renames, an update, a header rotation, a deletion and a birth: every kind of change."""
    ids = account.runner_ids()
    account.rename_runner(ids[step], f"renamed in step {step}")
    account.update_runner(ids[step + 10], tags=["moved"], status="disabled")
    account.rotate_header(ids[step + 20])
    account.delete_runner(ids[step + 30])
    account.create_runner(name=f"born in step {step}")
