"""The secret audit: no planted secret in any byte on disk or any byte of output.

Unique markers are planted upstream as a runner header value, as the user:password of a
runner endpoint (on a good runner and on one the API sends broken, so it lands in
rejected_records), as the API token, and as a wrong token. Every command line in
AUDITED_COMMANDS runs as a real process, in order (the syncs first, so the read commands
and exports have history to show: a rotated header, a rejected record); then every byte of
every file under the data folder is searched: the databases and their WAL (kept alive by an
open reader), the lock file, the snapshot files in Parquet and CSV, the files `export` and
`browse --metadata-out` wrote. Parquet is compressed, so its decoded rows are searched too.
So is every byte of every command's stdout and stderr (the scheduler's log included): no
marker may appear.

With `--store-header-values` (CLEAR_HEADER_COMMANDS: the same exports and read commands
after syncs that keep header values) the header marker must appear in the database, in
every snapshot and in every export file, and nowhere else: never in any output or log, nor
in the lock or metadata files. The endpoint password and the token still appear nowhere.

To audit a new command, add one line to the table it belongs in.
"""

from __future__ import annotations

import itertools
import re
import shlex
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from conftest import free_port, rows, run_comfysync

from pipeline.sim.simulator import SimulatedAccount

HEADER = "HEADERMARK-5be1c9d2"
PASSWORD = "PASSWORDMARK-0a7f44e1"
TOKEN = "TOKENMARK-e93b2c10"
WRONG_TOKEN = "WRONGTOKENMARK-4d1f86aa"
MARKERS = (HEADER, PASSWORD, TOKEN, WRONG_TOKEN)

#: The exports and read commands, audited after syncs with and without --store-header-values.
#: {db} is the audited database, {data} the data folder (snapshots go to {data}/exports),
#: {good} the runner whose header and endpoint hold markers, {as_of} the first sync's finish.
READ_COMMANDS: list[tuple[str, int]] = [
    ("export -o {data}/x.parquet --db {db}", 0),
    ("export -o {data}/x.csv --db {db}", 0),
    ("export --debug --include-deleted -o {data}/all.parquet --db {db}", 0),
    ("export --history -o {data}/h.parquet --db {db}", 0),
    ("export --history -o {data}/h.csv --db {db}", 0),
    ("export --as-of {as_of} -o {data}/then.parquet --db {db}", 0),
    ("export --as-of {as_of} --csv-safe -o {data}/then.csv --db {db}", 0),
    ("status --db {db}", 0),
    ("status --json --db {db}", 0),
    ("status --debug --db {db}", 0),
    ("status --check --db {db}", 2),  # every run partial (a rejected record): no success
    ("runs --db {db}", 0),
    ("runs --json --db {db}", 0),
    ("history {good} --db {db}", 0),
    ("history --json {good} --db {db}", 0),
    ("history --debug {good_prefix} --db {db}", 0),
    ("changes --since 24h --db {db}", 0),
    ("changes --since 24h --json --db {db}", 0),
    ("changes --debug --since 1d --db {db}", 0),
    ("browse --metadata-out {data}/metadata.json --db {db}", 0),
    ("browse --metadata-out - --db {db}", 0),
]

#: (command line after `comfysync`, expected exit code), run in this order. The token is in
#: COMFYCONTROL_TOKEN unless the line passes --token; {url} is the planted account.
AUDITED_COMMANDS: list[tuple[str, int]] = [
    ("sync --base-url {url} --db {db}", 0),  # then the header is rotated upstream
    ("sync --json --base-url {url} --db {db}", 0),
    ("sync --quiet --base-url {url} --db {db}", 0),
    ("sync --debug --base-url {url} --db {db} --per-page 7", 0),
    ("sync --debug --json --base-url {url} --db {db} --concurrency 1", 0),
    ("sync --base-url {url} --db {db} --token {token}", 0),
    ("sync --debug --base-url {url} --db {db} --token {wrong_token}", 3),
    ("sync --base-url {url} --db {db} --token {wrong_token}", 3),
    *READ_COMMANDS,
    ("schedule --every 1s --max-runs 1 --base-url {url} --db {db}", 0),
    ("schedule --every 1s --max-runs 1 --log-format json --base-url {url} --db {db}", 0),
    ("schedule --debug --every 1s --max-runs 1 --base-url {url} --db {db}", 0),
    ("demo --db {data}/demo.db", 0),
    ("demo --debug --db {data}/demo.db", 0),
]

#: The same with header values kept in clear: the header may reach the database and the
#: snapshot and export files, and nothing else.
CLEAR_HEADER_COMMANDS: list[tuple[str, int]] = [
    ("sync --store-header-values --base-url {url} --db {db}", 0),
    ("sync --store-header-values --json --base-url {url} --db {db}", 0),
    ("sync --store-header-values --quiet --base-url {url} --db {db}", 0),
    ("sync --store-header-values --debug --base-url {url} --db {db} --per-page 7", 0),
    ("sync --store-header-values --debug --base-url {url} --db {db} --token {wrong_token}", 3),
    *READ_COMMANDS,
    ("schedule --store-header-values --every 1s --max-runs 1 --log-format json --base-url {url} --db {db}", 0),
    ("schedule --store-header-values --debug --every 1s --max-runs 1 --base-url {url} --db {db}", 0),
]  # fmt: skip

#: What the commands write under the data folder besides the database and the snapshots.
EXPORT_FILES = (
    "x.parquet",
    "x.csv",
    "all.parquet",
    "h.parquet",
    "h.csv",
    "then.parquet",
    "then.csv",
)

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
    """Every file's bytes; a Parquet file's decoded rows are appended, as its pages are
    compressed and a secret inside them need not show up in the raw bytes."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            content = path.read_bytes()
            if path.suffix == ".parquet":
                content += repr(pq.read_table(path).to_pylist()).encode()
            files[path] = content
    return files


def simulator_secrets(runners: int, seed: int) -> set[str]:
    """The header secrets a seeded simulator serves, without 'Bearer '."""
    account = SimulatedAccount(runners=runners, seed=seed)
    return {
        value.split()[-1]
        for runner in account.list_runners()
        for value in runner["headers"].values()
    }


def audit(
    files: dict[Path, bytes], outputs: dict[str, str], secrets: set[str], *, clear_ok=frozenset()
) -> None:
    """No secret in any file or output; the files in ``clear_ok`` may hold generated header
    secrets (a mirror that keeps header values), never the planted ones in ``secrets``."""
    for secret in secrets:
        for path, content in files.items():
            assert secret.encode() not in content, (secret, path.name)
        for command, text in outputs.items():
            assert secret not in text, (secret, command)
    for path, content in files.items():
        assert path in clear_ok or not GENERATED_SECRET.search(content), path.name
    for command, text in outputs.items():
        assert not GENERATED_SECRET.search(text.encode()), command


#: Commands that only read the database: consecutive lines of these run concurrently.
READ_ONLY = frozenset(("export", "status", "runs", "history", "changes", "browse"))


def run_table(
    table: list[tuple[str, int]], folder: Path, values: dict[str, object], upstream, good: str
) -> tuple[dict[str, str], sqlite3.Connection]:
    """Run every line of ``table`` in ``folder``; return each line's output and the reader.

    After the first line (a sync) a reader is opened on the database and holds a snapshot,
    so every later sync's pages stay in the WAL to be searched, and the good runner's header
    is rotated upstream, so the later syncs record a header change. Lines run in order, except that a stretch of
    read-only commands runs concurrently (they write nothing the others read).
    """
    outputs: dict[str, str] = {}
    reader = None

    def run(number: int, line: str, expected: int) -> None:
        args = shlex.split(line.format(**values))
        result = run_comfysync(folder, *args, env={"COMFYCONTROL_TOKEN": TOKEN})
        assert result.exit_code == expected, (line, result.stderr)
        if "--debug" not in args:
            assert "Traceback" not in result.stderr, line
        outputs[f"{number}: {line}"] = result.stdout + result.stderr

    numbered = list(enumerate(table))
    for read_only, stretch in itertools.groupby(
        numbered, lambda item: item[1][0].split()[0] in READ_ONLY
    ):
        lines = [(number, line, expected) for number, (line, expected) in stretch]
        if read_only:
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda args: run(*args), lines))  # list(): re-raise failures
            continue
        for number, line, expected in lines:
            run(number, line, expected)
            if reader is None:
                reader = sqlite3.connect(Path(str(values["db"])))
                reader.execute("BEGIN")
                [(values["as_of"],)] = reader.execute(
                    "SELECT finished_at FROM sync_runs WHERE id = 1"
                ).fetchall()
                upstream.account.rotate_header(good, "X-Api-Key", f"{HEADER}-rotated")
    assert reader is not None
    return outputs, reader


def planted_values(upstream, data: Path, good: str) -> dict[str, object]:
    return {
        "url": upstream.url,
        "db": data / "mirror.db",
        "data": data,
        "good": good,
        "good_prefix": good[:8],
        "token": TOKEN,
        "wrong_token": WRONG_TOKEN,
    }


def test_no_secret_reaches_the_disk_or_any_output(serve_account, tmp_path):
    upstream = serve_account(runners=60, seed=31, token=TOKEN)
    good, broken = plant(upstream.account)
    data = tmp_path / "data"
    values = planted_values(upstream, data, good)
    db = data / "mirror.db"
    outputs, reader = run_table(AUDITED_COMMANDS, tmp_path, values, upstream, good)
    try:
        files = files_under(data)
        names = {str(path.relative_to(data)) for path in files}
        assert names >= {"mirror.db", "mirror.db-wal", "mirror.db.lock", "demo.db"}
        assert names >= {*EXPORT_FILES, "metadata.json"}
        snapshots = {name for name in names if name.startswith("exports/")}
        assert {name.rsplit(".", 1)[-1] for name in snapshots} == {"parquet", "csv"}
        # 9 mirror syncs (6 + 3 scheduled), each with its snapshot in both formats: written,
        # or kept from an earlier sync when the fleet had not changed; and the demo's 2.
        assert rows(db, "SELECT count(DISTINCT sync_id), count(*) FROM snapshots") == [(9, 18)]
        [(written,)] = rows(db, "SELECT count(*) FROM snapshots WHERE same_as_sync_id IS NULL")
        assert len(snapshots) == written + 2 * 2
        assert files[db.with_name("mirror.db-wal")]  # the WAL held data, and was searched
        audit(files, outputs, {*MARKERS, *simulator_secrets(250, 1)})
    finally:
        reader.close()

    # The markers were really there to be found: what the database made of them.
    [(headers, endpoint, version)] = rows(
        db, "SELECT headers, endpoint, version FROM runners WHERE id = ?", (good,)
    )
    [(raw_json,)] = rows(
        db, "SELECT raw_json FROM rejected_records WHERE runner_id = ? LIMIT 1", (broken,)
    )
    assert re.fullmatch(
        r'\{"Authorization":"redacted:[0-9a-f]{12}","X-Api-Key":"redacted:[0-9a-f]{12}"\}', headers
    )
    assert re.fullmatch(r"https://redacted:[0-9a-f]{12}@gpu\.example\.com:8443/comfy", endpoint)
    assert version == 2  # the rotated secret was recorded as a change, without its value
    assert '"Authorization":"redacted:' in raw_json and "root:" not in raw_json
    history = next(text for line, text in outputs.items() if "history {good} " in line)
    assert "headers: " in history and "redacted:" in history  # the change was shown


def test_store_header_values_puts_the_header_in_the_database_and_the_files_only(
    serve_account, tmp_path
):
    upstream = serve_account(runners=30, seed=32, token=TOKEN)
    good, _ = plant(upstream.account)
    data = tmp_path / "data"
    values = planted_values(upstream, data, good)
    outputs, reader = run_table(CLEAR_HEADER_COMMANDS, tmp_path, values, upstream, good)
    try:
        files = files_under(data)
    finally:
        reader.close()

    name = {path: str(path.relative_to(data)) for path in files}
    holding = {name[path] for path, content in files.items() if HEADER.encode() in content}
    snapshots = {n for n in name.values() if n.startswith("exports/")}
    # 4 syncs and 2 scheduled runs, each in both formats: written, or kept when unchanged.
    db = data / "mirror.db"
    assert rows(db, "SELECT count(DISTINCT sync_id), count(*) FROM snapshots") == [(6, 12)]
    [(written,)] = rows(db, "SELECT count(*) FROM snapshots WHERE same_as_sync_id IS NULL")
    assert len(snapshots) == written
    assert {"mirror.db.lock", "metadata.json"} <= set(name.values())
    assert holding & {"mirror.db", "mirror.db-wal"}
    assert holding - {"mirror.db", "mirror.db-wal"} == {*snapshots, *EXPORT_FILES}
    for command, text in outputs.items():
        assert HEADER not in text, command
    # Every header value is kept in those files (the generated ones too), and in no output.
    keep_values = {path for path in files if name[path] in holding}
    audit(files, outputs, {PASSWORD, TOKEN, WRONG_TOKEN}, clear_ok=keep_values)
    history = next(text for line, text in outputs.items() if "history {good} " in line)
    assert "headers: " in history and "redacted:" in history  # shown as the default shows it


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


#: The commands across a configuration file's accounts, run in order after writing it; one
#: account's token is in the file itself (mode 0600), the other's in AUDIT_TOKEN.
ACCOUNT_COMMANDS: list[tuple[str, int]] = [
    ("config check", 0),
    ("config --debug check", 0),
    ("accounts", 0),
    ("sync --all", 0),
    ("sync --all --json --debug --max-parallel 1", 0),
    ("accounts --json", 0),
    ("status --all --json", 0),
    ("runs --all", 0),
    ("history --all {good}", 0),
    ("changes --all --json", 0),
    ("export --all -o data/fleet.parquet", 0),
    ("browse --all --metadata-out data/accounts-metadata.json", 0),
    ("schedule --all --every 1s --max-runs 1 --log-format json --debug", 0),
    ("sync --account byenv --token {wrong_token}", 3),
]


def test_the_config_file_path_and_config_check_leak_no_token(serve_account, tmp_path):
    upstream = serve_account(runners=30, seed=34, token=TOKEN)
    good, _ = plant(upstream.account)
    config = tmp_path / "comfysync.toml"
    config.write_text(
        f'[defaults]\nexport_dir = "data/exports"\nbase_url = "{upstream.url}"\n\n'
        f'[accounts.infile]\ntoken = "{TOKEN}"\n\n[accounts.byenv]\ntoken_env = "AUDIT_TOKEN"\n'
    )
    config.chmod(0o600)
    outputs = {}
    for line, expected in ACCOUNT_COMMANDS:
        args = shlex.split(line.format(good=good, wrong_token=WRONG_TOKEN))
        result = run_comfysync(tmp_path, *args, env={"AUDIT_TOKEN": TOKEN})
        assert result.exit_code == expected, (line, result.stderr)
        outputs[line] = result.stdout + result.stderr
    check = outputs["config check"]
    assert "token = set (the file comfysync.toml)" in check
    assert "token = set (environment variable AUDIT_TOKEN)" in check
    files = files_under(tmp_path / "data")
    names = {str(path.relative_to(tmp_path / "data")) for path in files}
    assert {"infile.db", "byenv.db", "fleet-infile.parquet", "accounts-metadata.json"} <= names
    assert any(name.startswith("exports/parquet/runners/account=byenv/") for name in names)
    audit(files, outputs, {*MARKERS, *simulator_secrets(30, 34)})


#: The password of a notification URL: it may reach its own service, and nothing else.
NOTIFY_PASSWORD = "NOTIFYPASSMARK-7c3e9a51"


def test_notifications_pings_and_metrics_carry_no_secret(serve_account, receiver, tmp_path):
    """Every notice kind (changes of every kind, failure, recovery), every ping, the metrics
    file, and the warnings of a notifier that is down: no planted secret, no generated one."""
    upstream = serve_account(runners=20, seed=34, token=TOKEN)
    good, _ = plant(upstream.account)
    data = tmp_path / "data"
    hook = f"json://user:{NOTIFY_PASSWORD}@127.0.0.1:{receiver.port}/hook"
    down = f"json://user:{NOTIFY_PASSWORD}@127.0.0.1:{free_port()}/down"
    options = [
        "sync", "--base-url", upstream.url, "--db", "data/m.db", "--metrics-file", "data/m.prom",
        "--notify-on", "changes,failure,recovery", "--ping-url", f"http://127.0.0.1:{receiver.port}/ping/9f",
    ]  # fmt: skip
    env = {"COMFYCONTROL_TOKEN": TOKEN, "COMFYSYNC_NOTIFY": f"{hook} {down}"}
    outputs = {}

    def sync(name: str, expected: int, **extra: str) -> None:
        result = run_comfysync(tmp_path, *options, env={**env, **extra})
        assert result.exit_code == expected, result.stderr
        outputs[name] = result.stdout + result.stderr

    sync("first", 0)
    upstream.account.rotate_header(good, "X-Api-Key", f"{HEADER}-rotated")
    upstream.account.update_runner(good, status="disabled")
    upstream.account.delete_runner(upstream.account.runner_ids()[0])
    sync("changes", 0)
    sync("failure", 3, COMFYCONTROL_TOKEN=WRONG_TOKEN)
    sync("recovery", 0)

    notices = receiver.posted_json("/hook")
    assert [n["type"] for n in notices] == ["info", "info", "failure", "success"]
    assert "(status active -> disabled; changed headers)" in notices[1]["message"]
    sent = {
        f"{number}: {r.method} {r.path}": r.path
        + r.body.decode()
        + repr({k: v for k, v in r.headers.items() if k.lower() != "authorization"})
        for number, r in enumerate(receiver.requests)
    }
    assert len([line for line in sent if "/ping/" in line]) == 8  # start, then success or fail
    for request in receiver.requests:
        if request.path == "/hook":  # the notification URL's own credentials, to its service
            assert request.headers["Authorization"].startswith("Basic ")
    secrets = {*MARKERS, NOTIFY_PASSWORD, *simulator_secrets(20, 34)}
    audit(files_under(data), {**outputs, **sent}, secrets)
    for name in ("first", "changes", "failure", "recovery"):
        assert "user:****@127.0.0.1" in outputs[name], name  # the notifier down, masked
    [(warnings,)] = rows(data / "m.db", "SELECT warnings FROM sync_runs WHERE id = 3")
    assert "notification to json://user:****@127.0.0.1:" in warnings
