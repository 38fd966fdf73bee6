"""The performance benchmark runs from its documented command (no timing is asserted here),
and the page server it measures against answers exactly as the simulator does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import REPO, free_port, wait_until

CASES = {
    "floor", "wire", "cold", "warm", "churn", "default_cold", "default_warm", "default_churn",
    "cold_200", "export", "floor_latency_c1", "floor_latency_c4", "cold_latency_c1",
    "cold_latency_c4", "help", "sync_help",
}


def test_the_sync_benchmark_runs_at_a_small_size_and_writes_its_figures(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sync", "--runners", "2000", "--repeat", "1",
         "--latency-ms", "5", "--results", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = list(tmp_path.glob("sync-2000-*.json"))
    report = json.loads(written.read_text())
    assert (report["plan"], report["server"]) == ("full", "pages")
    assert set(report["cases"]) == CASES
    for name, figures in report["cases"].items():
        assert len(figures["runs"]) == 1 and figures["median_seconds"] > 0, name
        assert figures["peak_rss_mb"] > 0, name
        assert figures["ratio_to_floor"] > 0 and figures["ratio_to_wire"] > 0, name
    assert {t["target"] for t in report["targets"]} >= {
        "cold <= 2.5x floor", "warm <= 1.3x floor", "churn <= 1.4x floor",
        "sync peak RSS <= 300 MB", "export peak RSS <= 400 MB",
        "default cold <= 2.5x floor", "default warm <= 1.0x floor",
        "default churn <= 1.4x floor", "every sync peak RSS <= 250 MB",
    }
    assert "case" in proc.stdout and "x floor" in proc.stdout and "x wire" in proc.stdout
    assert "PASS" in proc.stdout or "MISS" in proc.stdout


TOKEN = "bench-token"
SERVER_OPTIONS = {
    "plain": ["--runners", "250"],
    "churned": ["--runners", "250", "--updates", "3", "--creates", "2", "--deletes", "2"],
}


@contextmanager
def benchmark_server(module: str, *options: str) -> Iterator[str]:
    """``python -m benchmarks.<module>`` on a free loopback port, as the benchmark runs it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"benchmarks.{module}", "--port", str(port), "--token", TOKEN,
         *options],
        cwd=REPO, stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: proc.poll() is not None or listening(port), timeout=60)
        assert proc.poll() is None, f"benchmarks.{module} exited"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("account", sorted(SERVER_OPTIONS))
def test_the_page_server_sends_the_simulators_bytes(account):
    requests = [
        "?page=1&per_page=100", "?page=3&per_page=100", "?page=4&per_page=100",  # last, past
        "?page=2&per_page=7", "?page=36&per_page=7", "", "?page=2",
        "?page=0&per_page=100", "?page=1&per_page=101", "?page=x",  # the simulator's 400s
        "?page=1&per_page=100",  # served again: the same bytes
    ]
    options = SERVER_OPTIONS[account]
    with (
        benchmark_server("pages", *options) as pages,
        benchmark_server("simserver", *options) as simulator,
        httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as client,
    ):
        for query in requests:
            ours = client.get(f"{pages}/v1/runner{query}")
            theirs = client.get(f"{simulator}/v1/runner{query}")
            assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content), query
            assert ours.headers["content-type"] == "application/json", query
        for method, path in (("GET", "/v1/runners"), ("POST", "/v1/runner")):  # 404, 405
            ours = client.request(method, f"{pages}{path}")
            theirs = client.request(method, f"{simulator}{path}")
            assert (ours.status_code, ours.content) == (theirs.status_code, theirs.content), path


def test_the_page_server_refuses_a_wrong_or_missing_token_and_the_wire_floor_reads_it():
    with (
        benchmark_server("pages", *SERVER_OPTIONS["plain"]) as pages,
        benchmark_server("simserver", *SERVER_OPTIONS["plain"]) as simulator,
    ):
        for headers in ({"Authorization": "Bearer wrong-token"}, {}):
            ours = httpx.get(f"{pages}/v1/runner?page=1&per_page=100", headers=headers)
            theirs = httpx.get(f"{simulator}/v1/runner?page=1&per_page=100", headers=headers)
            assert (ours.status_code, ours.content) == (401, theirs.content)
            assert ours.headers["www-authenticate"] == "Bearer"
        wire = subprocess.run(
            [sys.executable, "-m", "benchmarks.wire", "--base-url", pages, "--token", TOKEN],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )
        bodies = sum(
            len(httpx.get(f"{pages}/v1/runner?page={number}&per_page=100",
                          headers={"Authorization": f"Bearer {TOKEN}"}).content)
            for number in (1, 2, 3)
        )
        assert bodies < int(wire.stdout) < bodies + 3 * 200  # the three bodies and their heads
