"""Every reader works for a user who can read the mirror but not write its folder.

The scheduling page's systemd layout: `comfysync sync` runs as its own user and owns the folder; other
users read the database. SQLite can read a WAL database without write access only if its
-wal and -shm files are there (https://www.sqlite.org/wal.html, "Read-Only Databases"), so a
sync must leave them, and every reader (status, runs, history, changes, export, RunnerStore,
browse) must open the database without creating or writing anything beside it.

Tests run as root in CI, and root ignores permission bits. So the reader is run as a process
without any capability (``setpriv``): the kernel then checks the permission bits for it as
for any user, and the mirror's folder and files are handed to another user (``nobody``),
folder mode 555, files 644. Run as an ordinary user, the folder is made 555 for the reads.
Each test first proves its premise: the reader cannot create a file in the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import (
    CliResult,
    Upstream,
    cli_environment,
    free_port,
    get_once_served,
    run_comfysync,
)

AS_ROOT = os.geteuid() == 0
#: What makes a process "another user": root without any capability, or (not root) nothing.
READER_PREFIX = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if AS_ROOT else []
TOKEN = {"COMFYCONTROL_TOKEN": "test-token"}
RUNNERS = 12


@dataclass(frozen=True)
class SharedMirror:
    """A mirror a real `comfysync sync` made, in a folder only its owner may write."""

    cwd: Path
    folder: Path
    db: Path
    upstream: Upstream

    def read(self, *args: str, timeout: float = 120) -> CliResult:
        """`comfysync *args` run by the other user."""
        proc = subprocess.run(
            [*READER_PREFIX, sys.executable, "-m", "pipeline.cli", *args],
            cwd=self.cwd,
            env=cli_environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def read_as_owner(self, *args: str) -> CliResult:
        return run_comfysync(self.cwd, *args)

    def python_as_reader(self, code: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*READER_PREFIX, sys.executable, "-c", code, *args],
            cwd=self.cwd,
            env=cli_environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def sync(self) -> CliResult:
        """A real `comfysync sync` by the folder's owner."""
        with self.owner_may_write():
            return run_comfysync(
                self.cwd, "sync", "--db", str(self.db), "--base-url", self.upstream.url, env=TOKEN
            )

    @contextmanager
    def owner_may_write(self) -> Iterator[None]:
        # Root writes the folder whatever its mode, as the owning service user would; an
        # ordinary user running the tests is owner and reader at once, so the folder is
        # opened to it only while it syncs.
        if not AS_ROOT:
            self.folder.chmod(0o755)
        try:
            yield
        finally:
            if not AS_ROOT:
                self.folder.chmod(0o555)

    def remove_wal_files(self) -> None:
        """What a read-write connection closing last does, say the owner's `sqlite3 db`."""
        with self.owner_may_write():
            conn = sqlite3.connect(self.db)
            conn.execute("SELECT 1 FROM runners").fetchall()
            conn.close()
        assert sorted(p.name for p in self.folder.iterdir()) == [
            "comfysync.db",
            "comfysync.db.key",
            "comfysync.db.lock",
        ]


def hand_over(folder: Path) -> None:
    """Give the folder and its files to another user: readable by all, writable by none else."""
    for path in [folder, *folder.iterdir()]:
        if AS_ROOT:
            shutil.chown(path, "nobody", "nogroup")
        if path.name.endswith(".key"):
            continue  # the redaction key stays its owner's alone (0600)
        path.chmod(0o555 if path.is_dir() else 0o644)


def assert_reader_cannot_write(mirror: SharedMirror) -> None:
    probe = mirror.folder / "probe"
    proc = mirror.python_as_reader(f"open({str(probe)!r}, 'x')")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "PermissionError" in stderr, stderr
    assert not probe.exists()


@pytest.fixture
def shared_mirror(tmp_path: Path, serve_account: Callable[..., Upstream]) -> SharedMirror:
    upstream = serve_account(runners=RUNNERS, seed=7)
    folder = tmp_path / "state"
    folder.mkdir()
    mirror = SharedMirror(tmp_path, folder, folder / "comfysync.db", upstream)
    result = mirror.sync()
    assert result.exit_code == 0, result.stderr
    hand_over(folder)
    assert_reader_cannot_write(mirror)
    return mirror


def files_in(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Each file's owner, group and mode."""
    return {
        path.name: (path.stat().st_uid, path.stat().st_gid, path.stat().st_mode & 0o777)
        for path in folder.iterdir()
    }


def test_a_sync_leaves_the_wal_and_shm_files_readers_need(shared_mirror: SharedMirror):
    shared_mirror.remove_wal_files()
    result = shared_mirror.sync()
    assert result.exit_code == 0, result.stderr
    db = shared_mirror.db
    found = files_in(shared_mirror.folder)
    assert sorted(found) == sorted(
        [db.name, f"{db.name}-wal", f"{db.name}-shm", f"{db.name}.key", f"{db.name}.lock"]
    )
    # As readable, by the same users, as the database itself.
    assert found[f"{db.name}-wal"] == found[f"{db.name}-shm"] == found[db.name]
    assert os.path.getsize(f"{db}-wal") == 0  # checkpointed: everything is in the database


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["runs"],
        ["runs", "--json", "--status", "success"],
        ["history", "FIRST_RUNNER"],
        ["history", "FIRST_RUNNER", "--json"],
        ["changes", "--since", "2020-01-01"],
        ["changes", "--since", "2020-01-01", "--json"],
    ],
)
def test_read_commands_show_the_other_user_what_they_show_the_owner(
    shared_mirror: SharedMirror, command: list[str]
):
    first_runner = shared_mirror.upstream.account.runner_ids()[0]
    args = [first_runner if arg == "FIRST_RUNNER" else arg for arg in command]
    args += ["--db", str(shared_mirror.db)]
    as_reader = shared_mirror.read(*args)
    as_owner = shared_mirror.read_as_owner(*args)
    assert (as_owner.exit_code, as_owner.stderr) == (0, "")
    assert (as_reader.exit_code, as_reader.stderr, as_reader.stdout) == (0, "", as_owner.stdout)
    assert str(RUNNERS) in as_reader.stdout or command[0] == "history"


@pytest.mark.parametrize(
    "output, flags",
    [("fleet.csv", []), ("fleet.parquet", []), ("history.csv", ["--history"])],
)
def test_export_by_the_other_user_into_a_folder_it_can_write(
    shared_mirror: SharedMirror, output: str, flags: list[str]
):
    for who in ("reader", "owner"):
        (shared_mirror.cwd / who).mkdir()
    db = str(shared_mirror.db)
    as_reader = shared_mirror.read("export", "--db", db, *flags, "-o", f"reader/{output}")
    as_owner = shared_mirror.read_as_owner("export", "--db", db, *flags, "-o", f"owner/{output}")
    assert as_owner.exit_code == 0, as_owner.stderr
    assert as_reader.exit_code == 0, as_reader.stderr
    assert as_reader.stdout == as_owner.stdout.replace("owner/", "reader/")
    written, expected = (shared_mirror.cwd / who / output for who in ("reader", "owner"))
    if output.endswith(".parquet"):
        assert pq.read_table(written).to_pylist() == pq.read_table(expected).to_pylist()
        assert pq.read_table(written).num_rows == RUNNERS
    else:
        assert written.read_bytes() == expected.read_bytes()


FRAMES = """
import json, sys
from pipeline import RunnerStore
with RunnerStore(sys.argv[1]) as store:
    frames = {
        "runners": store.runners(include_deleted=True),
        "versions": store.versions(),
        "runs": store.runs(),
        "as_of": store.as_of("2100-01-01"),
    }
    print(json.dumps({name: frame.to_json(orient="records", date_format="iso")
                      for name, frame in frames.items()}))
"""


def test_runner_store_gives_the_other_user_the_owners_frames(shared_mirror: SharedMirror):
    reader = shared_mirror.python_as_reader(FRAMES, str(shared_mirror.db))
    read, errors = reader.communicate(timeout=120)
    assert (reader.returncode, errors) == (0, "")
    owner = subprocess.run(
        [sys.executable, "-c", FRAMES, str(shared_mirror.db)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(read) == json.loads(owner.stdout)
    assert len(json.loads(json.loads(read)["runners"])) == RUNNERS


def test_browse_serves_the_other_user(shared_mirror: SharedMirror):
    port = free_port()
    proc = subprocess.Popen(
        [*READER_PREFIX, sys.executable, "-m", "pipeline.cli", "browse", "--port", str(port),
         "--db", str(shared_mirror.db)],
        cwd=shared_mirror.cwd, env=cli_environment(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/comfysync/runners.json?_shape=array&_size=max"
        response = get_once_served(proc, url)
        assert response.status_code == 200
        served = sorted(row["id"] for row in response.json())
        assert served == sorted(shared_mirror.upstream.account.runner_ids())
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr


HOLD_A_SNAPSHOT = """
import sys
from pipeline.store.schema import open_store_read_only
db = open_store_read_only(__import__("pathlib").Path(sys.argv[1]))
db.execute("BEGIN")
count = lambda: db.execute("SELECT count(*) FROM runners WHERE deleted_at IS NULL").fetchone()[0]
print(count(), flush=True)
sys.stdin.readline()
print(count(), flush=True)
db.execute("COMMIT")
print(count(), flush=True)
db.close()
"""


def test_a_reader_reading_meanwhile_neither_blocks_nor_harms_the_syncs(
    shared_mirror: SharedMirror,
):
    account = shared_mirror.upstream.account
    reader = shared_mirror.python_as_reader(HOLD_A_SNAPSHOT, str(shared_mirror.db))
    assert reader.stdout is not None and reader.stdin is not None
    assert reader.stdout.readline() == f"{RUNNERS}\n"  # it holds a snapshot now

    account.create_runner(name="created-while-read")
    account.delete_runner(account.runner_ids()[0])
    account.create_runner(name="created-too")
    during = shared_mirror.sync()
    assert during.exit_code == 0, during.stderr

    reader.stdin.write("\n")
    reader.stdin.flush()
    rest, errors = reader.communicate(timeout=60)
    # Its snapshot stayed as it began; once it ended, it sees the sync's commit.
    assert (reader.returncode, errors, rest) == (0, "", f"{RUNNERS}\n{RUNNERS + 1}\n")

    after = shared_mirror.sync()
    assert after.exit_code == 0, after.stderr
    assert (
        json.loads(shared_mirror.read("status", "--json", "--db", str(shared_mirror.db)).stdout)[
            "runners_present"
        ]
        == RUNNERS + 1
    )
    conn = sqlite3.connect(f"{shared_mirror.db.as_uri()}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert (
            conn.execute("SELECT status FROM sync_runs ORDER BY id").fetchall()
            == [("success",)] * 3
        )
    finally:
        conn.close()


def test_without_the_wal_files_the_other_user_is_told_what_to_do(shared_mirror: SharedMirror):
    shared_mirror.remove_wal_files()  # which the other user cannot create
    for command in ("status", "runs"):
        result = shared_mirror.read(command, "--db", str(shared_mirror.db))
        assert (result.exit_code, result.stdout) == (2, "")
        assert result.stderr == (
            f"comfysync: error: cannot read {shared_mirror.db}: its -wal and -shm files are "
            f"missing and {shared_mirror.folder} is not writable to create them; the next "
            "`comfysync sync` leaves them for readers\n"
        )


@pytest.mark.parametrize("unreadable", ["comfysync.db-wal", "comfysync.db-shm"])
def test_a_file_the_other_user_may_not_read_is_named(shared_mirror: SharedMirror, unreadable: str):
    (shared_mirror.folder / unreadable).chmod(0o000)
    result = shared_mirror.read("changes", "--db", str(shared_mirror.db))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == (
        f"comfysync: error: cannot read {shared_mirror.db}: {unreadable} is not readable by "
        "you; ask its owner to let you read it\n"
    )
