"""Datasette over the mirror with the bundled metadata: its own test client, and `browse` live."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, free_port, get_once_served, rows
from datasette.app import Datasette
from mirror_fixture import Mirror

from pipeline.read.browse import INSTALL_HINT, metadata_for
from pipeline.store.schema import open_store


def get(path: Path, *urls: str) -> list[Any]:
    """GET each url from Datasette's own client over ``path`` with the bundled metadata."""

    async def fetch() -> list[Any]:
        datasette = Datasette([str(path)], metadata=metadata_for(path))
        try:
            return [await datasette.client.get(url) for url in urls]
        finally:
            for database in datasette.databases.values():
                database.close()

    return asyncio.run(fetch())


def ever_seen(mirror: Mirror) -> list[dict[str, Any]]:
    return [*mirror.upstream, mirror.deleted]


def test_the_metadata_describes_every_table_view_and_column(tmp_path: Path):
    db = open_store(tmp_path / "comfysync.db")
    described = metadata_for(tmp_path / "comfysync.db")["databases"]["comfysync"]["tables"]
    shadow = {f"runners_fts_{suffix}" for suffix in ("data", "idx", "docsize", "config")}
    names = [n for n in db.table_names() if n not in shadow] + db.view_names()
    assert sorted(described) == sorted(names)
    for name in names:
        entry = described[name]
        assert entry["description"].strip(), name
        columns = [
            c.name for c in (db.table(name) if name in db.table_names() else db.view(name)).columns
        ]
        assert sorted(entry["columns"]) == sorted(columns), name
        assert all(text.strip() for text in entry["columns"].values()), name
    runners = described["runners"]["columns"]
    assert "complete sync found the runner gone" in runners["deleted_at"]
    assert "redacted:" in runners["headers"]
    assert (
        "empty for the runner's current version"
        in described["runner_versions"]["columns"]["valid_to"]
    )


def test_the_metadata_is_keyed_by_the_database_file_name():
    assert list(metadata_for(Path("data/demo.db"))["databases"]) == ["demo"]
    assert list(metadata_for(Path("x/comfysync.db"))["databases"]) == ["comfysync"]
    bundled = json.loads((REPO / "pipeline" / "read" / "datasette_metadata.json").read_text())
    assert (
        metadata_for(Path("data/demo.db"))["databases"]["demo"] == bundled["databases"]["comfysync"]
    )


def test_the_runners_table_sorts_by_updated_at_and_facets_status(mirror: Mirror):
    [response] = get(mirror.path, "/mirror/runners.json?_shape=objects&_size=100")
    assert response.status_code == 200
    body = response.json()
    assert [r["id"] for r in body["rows"]] == [
        r["id"] for r in sorted(ever_seen(mirror), key=lambda r: r["updated_at"], reverse=True)
    ]
    assert body["rows"][0]["id"] == mirror.rotated_after["id"]
    facets = {
        name: {item["value"]: item["count"] for item in result["results"]}
        for name, result in body["facet_results"].items()
    }
    assert facets == {"status": dict(Counter(r["status"] for r in ever_seen(mirror)))}


def test_a_facet_on_status_and_on_tags_via_runner_tags(mirror: Mirror):
    by_status, by_tag = get(
        mirror.path,
        "/mirror/current_runners.json?_facet=status&_size=0",
        "/mirror/runner_tags.json?_size=0",
    )
    assert (by_status.status_code, by_tag.status_code) == (200, 200)
    status = by_status.json()["facet_results"]["status"]["results"]
    assert {item["value"]: item["count"] for item in status} == Counter(
        r["status"] for r in mirror.upstream
    )
    tags = by_tag.json()["facet_results"]["tag"]["results"]
    assert {item["value"]: item["count"] for item in tags} == Counter(
        tag for r in mirror.upstream for tag in r["tags"]
    )


def test_search_finds_a_renamed_runner_under_its_new_name_only(mirror: Mirror):
    new, old, page = get(
        mirror.path,
        "/mirror/runners.json?_search=renamed&_shape=array",
        "/mirror/runners.json?_search=hunyuan&_shape=array",
        "/mirror/runners?_search=renamed",
    )
    assert new.status_code == old.status_code == page.status_code == 200
    assert [(r["id"], r["name"]) for r in new.json()] == [
        (mirror.renamed_after["id"], "renamed-runner")
    ]
    assert old.json() == []
    assert "1 row where search matches" in page.text


def test_the_html_pages_show_the_descriptions(mirror: Mirror):
    home, runners = get(mirror.path, "/", "/mirror/runners")
    assert home.status_code == runners.status_code == 200
    assert "comfysync: ComfyControl runners mirror" in home.text
    assert "When a complete sync found the runner gone upstream" in runners.text
    assert "comfysync_meta" not in home.text  # hidden: comfysync's own settings


def aged_copy(mirror: Mirror, tmp_path: Path) -> Path:
    """The mirror with sync 1 moved three days back and one runner deleted ten days ago."""
    path = tmp_path / "mirror.db"
    shutil.copy(mirror.path, path)
    now = datetime.now(UTC)
    three_days_ago = (now - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    ten_days_ago = (now - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE runner_versions SET valid_from = ? WHERE sync_id = 1", [three_days_ago]
        )
        conn.execute(
            "UPDATE runners SET deleted_at = ? WHERE name = 'Production Runner'", [ten_days_ago]
        )
    conn.close()
    return path


def test_each_canned_query_answers_with_the_expected_rows(mirror: Mirror, tmp_path: Path):
    path = aged_copy(mirror, tmp_path)
    changed, deleted, tags = get(
        path,
        "/mirror/changed_last_24_hours.json?_shape=array",
        "/mirror/deleted_this_week.json?_shape=array",
        "/mirror/tag_counts.json?_shape=array",
    )
    assert changed.status_code == deleted.status_code == tags.status_code == 200
    expected_changes = rows(
        path,
        "SELECT changed_at, change, name, runner_id, version, field, old_value, new_value, "
        "sync_id FROM runner_changes WHERE sync_id = 2",
    )
    assert len(expected_changes) == 9 + 1 + 2 + 2  # created (every field), deleted, 2 updates
    assert Counter(tuple(r.values()) for r in changed.json()) == Counter(expected_changes)
    assert {
        (r["change"], r["name"], r["field"]) for r in changed.json() if r["change"] != "created"
    } == {
        ("deleted", "flux-batch-ap-8", None),
        ("updated", "renamed-runner", "name"),
        ("updated", "renamed-runner", "updated_at"),
        ("updated", "Research H100 Runner 535", "headers"),
        ("updated", "Research H100 Runner 535", "updated_at"),
    }
    assert [(r["id"], r["name"]) for r in deleted.json()] == [
        (mirror.deleted["id"], "flux-batch-ap-8")
    ]
    present = [r for r in mirror.upstream if r["name"] != "Production Runner"]
    counts = Counter(tag for r in present for tag in r["tags"])
    active = Counter(tag for r in present if r["status"] == "active" for tag in r["tags"])
    assert tags.json() == [
        {"tag": tag, "runners": n, "active": active[tag]}
        for tag, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]


def test_metadata_out_writes_a_file_datasette_reads(run_cli, tmp_path, mirror: Mirror):
    result = run_cli("browse", "--metadata-out", "meta.json", "--db", "data/comfysync.db")
    assert (result.exit_code, result.stdout) == (0, "")
    assert result.stderr == (
        "wrote meta.json; run: datasette data/comfysync.db --metadata meta.json\n"
    )
    written = json.loads((tmp_path / "meta.json").read_text())
    assert written == metadata_for(Path("data/comfysync.db"))
    to_stdout = run_cli("browse", "--metadata-out", "-", "--db", "data/demo.db")
    assert json.loads(to_stdout.stdout) == metadata_for(Path("data/demo.db"))
    # Datasette's own command line, as the analysis page shows it, with that file.
    (tmp_path / "data").mkdir(exist_ok=True)
    shutil.copy(mirror.path, tmp_path / "data" / "comfysync.db")
    proc = subprocess.run(
        [sys.executable, "-m", "datasette", "data/comfysync.db", "--metadata", "meta.json",
         "--get", "/comfysync/tag_counts.json?_shape=array"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sum(row["runners"] for row in json.loads(proc.stdout)) == sum(
        len(r["tags"]) for r in mirror.upstream
    )


def test_browse_serves_the_mirror_on_loopback_until_interrupted(mirror: Mirror, start_cli):
    port = free_port()
    proc = start_cli("browse", "--port", str(port), "--db", str(mirror.path))
    try:
        url = f"http://127.0.0.1:{port}/mirror/runners.json?_search=renamed&_shape=array"
        response = get_once_served(proc, url)
        assert response.status_code == 200
        assert [r["name"] for r in response.json()] == ["renamed-runner"]
        assert httpx.get(f"http://127.0.0.1:{port}/mirror/tag_counts", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert f"browse http://127.0.0.1:{port}/mirror (Ctrl+C stops)" in stderr


def test_browse_without_datasette_says_how_to_install_it(mirror: Mirror):
    code = (
        "import sys; sys.modules['datasette'] = None\n"
        "from pipeline.cli import main\n"
        f"main(['browse', '--db', {str(mirror.path)!r}])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"comfysync: error: {INSTALL_HINT}\n"
    assert INSTALL_HINT == (
        "Datasette is not installed; install the extra: pip install 'comfysync[datasette]' "
        "(from a checkout: pip install '.[datasette]')"
    )


@pytest.mark.parametrize("port", ["0", "70000"])
def test_browse_refuses_a_port_it_cannot_use(run_cli, port):
    result = run_cli("browse", "--port", port)
    assert result.exit_code == 2 and "--port" in result.stderr


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound"])
def test_browse_on_a_port_in_use_exits_2_naming_it_and_never_prints_the_url(
    mirror: Mirror, run_cli, listening
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        if listening:
            taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("browse", "--port", str(port), "--db", str(mirror.path), timeout=60)
    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    assert result.stderr == (
        f"comfysync: error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "pass another --port\n"
    )


def test_browse_prints_its_url_only_once_it_answers(mirror: Mirror, start_cli):
    port = free_port()
    proc = start_cli("browse", "--port", str(port), "--db", str(mirror.path))
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("browse http://"):
                break
        else:
            pytest.fail("browse ended without printing its URL")
        assert line == f"browse http://127.0.0.1:{port}/mirror (Ctrl+C stops)\n"
        # No retry: the URL is only printed once the server takes requests.
        assert httpx.get(f"http://127.0.0.1:{port}/mirror.json", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("name", ["m.db", "./m.db", "m.db-wal", "m.db.lock"])
def test_metadata_out_never_overwrites_the_database_or_its_files(name, run_cli, tmp_path, mirror):
    shutil.copy(mirror.path, tmp_path / "m.db")
    for suffix in ("-wal", ".lock"):
        (tmp_path / f"m.db{suffix}").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    result = run_cli("browse", "--db", "m.db", "--metadata-out", name)
    assert (result.exit_code, result.stdout) == (2, ""), result.stderr
    assert result.stderr == (
        f"comfysync: error: --metadata-out {Path(name)} is the database (--db m.db) or one of "
        "its files; pass another file name\n"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    beside = run_cli("browse", "--db", "m.db", "--metadata-out", "m.db.json")
    assert beside.exit_code == 0 and json.loads((tmp_path / "m.db.json").read_text())
