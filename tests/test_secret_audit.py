"""The secret audit: no planted secret in any byte on disk or any byte of output.

Unique markers are planted upstream as a runner header value, as the user:password of a
runner endpoint (on a good runner and on one the API sends broken, so it lands in
rejected_records), as the API token, and as a wrong token. Every command line in
AUDITED_COMMANDS runs as a real process; then every byte of every file under the data folder
(the databases, their WAL, kept alive by an open reader, and whatever else is there) and every
byte of every command's stdout and stderr are searched: no marker may appear. With
`--store-header-values` the header marker must appear in that database, and nowhere else.

To audit a new command, add one line to AUDITED_COMMANDS.
"""

from __future__ import annotations

import re
import shlex
import sqlite3
from pathlib import Path

from conftest import run_comfysync

from pipeline.simulator import SimulatedAccount

HEADER = "HEADERMARK-5be1c9d2"
PASSWORD = "PASSWORDMARK-0a7f44e1"
TOKEN = "TOKENMARK-e93b2c10"
WRONG_TOKEN = "WRONGTOKENMARK-4d1f86aa"
MARKERS = (HEADER, PASSWORD, TOKEN, WRONG_TOKEN)

#: (command line after `comfysync`, expected exit code). The token is in COMFYCONTROL_TOKEN
#: unless the line passes --token. {url} is the planted account, {db} the audited database,
#: {data} the data folder.
AUDITED_COMMANDS: list[tuple[str, int]] = [
    ("sync --base-url {url} --db {db}", 0),
    ("sync --json --base-url {url} --db {db}", 0),
    ("sync --debug --base-url {url} --db {db} --per-page 7", 0),
    ("sync --debug --json --base-url {url} --db {db} --concurrency 1", 0),
    ("sync --base-url {url} --db {db} --token {token}", 0),
    ("sync --debug --base-url {url} --db {db} --token {wrong_token}", 3),
    ("sync --base-url {url} --db {db} --token {wrong_token}", 3),
    ("demo --db {data}/demo.db", 0),
    ("demo --debug --db {data}/demo.db", 0),
]

#: A secret the simulator generated: 32 hex digits standing alone (ids, hashes, redactions
#: and the redaction key all have other lengths).
GENERATED_SECRET = re.compile(rb"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


def plant(account: SimulatedAccount) -> tuple[str, str]:
    """Plant the markers on two runners; return their ids (the good one, the broken one)."""
    good, broken = account.runner_ids()[3], account.runner_ids()[9]
    account.update_runner(
        good,
        headers={"Authorization": f"Bearer {HEADER}", "X-Api-Key": HEADER},
        endpoint=f"https://admin:{PASSWORD}@gpu.example.com:8443/comfy",
    )
    account.update_runner(
        broken,
        tags=f"not-a-list-{HEADER}"[:10],  # rejected: tags is not a list
        headers={"Authorization": f"Bearer {HEADER}"},
        endpoint=f"https://root:{PASSWORD}@10.0.0.7:8188",
    )
    return good, broken


def files_under(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def simulator_secrets(runners: int, seed: int) -> set[str]:
    """The header secrets a seeded simulator serves, without 'Bearer '."""
    account = SimulatedAccount(runners=runners, seed=seed)
    return {
        value.split()[-1]
        for runner in account.list_runners()
        for value in runner["headers"].values()
    }


def audit(files: dict[Path, bytes], outputs: dict[str, str], secrets: set[str]) -> None:
    for secret in secrets:
        for path, content in files.items():
            assert secret.encode() not in content, (secret, path.name)
        for command, text in outputs.items():
            assert secret not in text, (secret, command)
    for path, content in files.items():
        assert not GENERATED_SECRET.search(content), path.name
    for command, text in outputs.items():
        assert not GENERATED_SECRET.search(text.encode()), command


def test_no_secret_reaches_the_disk_or_any_output(serve_account, tmp_path):
    upstream = serve_account(runners=60, seed=31, token=TOKEN)
    good, broken = plant(upstream.account)
    data = tmp_path / "data"
    db = data / "mirror.db"
    values = {
        "url": upstream.url,
        "db": db,
        "data": data,
        "token": TOKEN,
        "wrong_token": WRONG_TOKEN,
    }
    outputs: dict[str, str] = {}
    reader = None
    for number, (line, expected) in enumerate(AUDITED_COMMANDS):
        args = shlex.split(line.format(**values))
        result = run_comfysync(tmp_path, *args, env={"COMFYCONTROL_TOKEN": TOKEN})
        assert result.exit_code == expected, (line, result.stderr)
        outputs[f"{number}: {line}"] = result.stdout + result.stderr
        if reader is None and db.exists():
            # An open reader keeps each later sync's WAL on disk, to be searched too.
            reader = sqlite3.connect(db)
            reader.execute("SELECT count(*) FROM runners").fetchone()
            upstream.account.rotate_header(good, "X-Api-Key", f"{HEADER}-rotated")
    try:
        files = files_under(data)
        assert {path.name for path in files} >= {"mirror.db", "mirror.db-wal", "demo.db"}
        assert files[db.with_name("mirror.db-wal")]  # the WAL held data, and was searched
        audit(files, outputs, {*MARKERS, *simulator_secrets(250, 1)})
    finally:
        if reader is not None:
            reader.close()

    # The markers were really there to be found: what the database made of them.
    conn = sqlite3.connect(db)
    [(headers, endpoint, version)] = conn.execute(
        "SELECT headers, endpoint, version FROM runners WHERE id = ?", [good]
    ).fetchall()
    [(raw_json,)] = conn.execute(
        "SELECT raw_json FROM rejected_records WHERE runner_id = ? LIMIT 1", [broken]
    ).fetchall()
    conn.close()
    assert re.fullmatch(
        r'\{"Authorization":"redacted:[0-9a-f]{12}","X-Api-Key":"redacted:[0-9a-f]{12}"\}', headers
    )
    assert re.fullmatch(r"https://redacted:[0-9a-f]{12}@gpu\.example\.com:8443/comfy", endpoint)
    assert version == 2  # the rotated secret was recorded as a change, without its value
    assert '"Authorization":"redacted:' in raw_json and "root:" not in raw_json


def test_store_header_values_puts_the_header_in_that_database_only(serve_account, tmp_path):
    upstream = serve_account(runners=30, seed=32, token=TOKEN)
    plant(upstream.account)
    data = tmp_path / "data"
    result = run_comfysync(
        tmp_path, "sync", "--debug", "--store-header-values", "--base-url", upstream.url,
        "--db", str(data / "clear.db"), env={"COMFYCONTROL_TOKEN": TOKEN},
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr

    files = files_under(data)
    assert any(HEADER.encode() in content for content in files.values())
    assert HEADER not in result.stdout + result.stderr
    for secret in (PASSWORD, TOKEN):
        assert all(secret.encode() not in content for content in files.values())
        assert secret not in result.stdout + result.stderr


def test_simulate_and_a_sync_against_it_print_no_secret(run_simulator, run_cli, tmp_path):
    simulator = run_simulator(
        "--runners", "40", "--seed", "33", "--token", TOKEN, "--debug", "--fail-rate", "0.2"
    )
    synced = run_cli(
        "sync", "--debug", "--base-url", simulator.url, "--db", "data/simulated.db",
        env={"COMFYCONTROL_TOKEN": TOKEN},
    )  # fmt: skip
    served = simulator.stop()
    assert synced.exit_code == 0, synced.stderr
    assert "GET /v1/runner page=1" in served.stderr  # its --debug trace was audited
    outputs = {
        "simulate": served.stdout + served.stderr,
        "sync": synced.stdout + synced.stderr,
    }
    audit(files_under(tmp_path / "data"), outputs, {TOKEN, *simulator_secrets(40, 33)})
