"""Take docs/images/browse.png: `comfysync browse` on the demo database, in headless Chromium.

Run from a checkout, with Chromium installed (`apt-get install chromium`):

    .venv/bin/python docs/scripts/screenshot.py [--page comfysync|demo|demo/runners]

It makes the demo database in a temporary folder, serves it with `comfysync browse` on a
free port of 127.0.0.1 (the bundled Datasette metadata included), waits until the page
answers, and saves what Chromium renders. Nothing leaves the machine. CI does not run it,
since Chromium may be absent there; run it again when the metadata or the demo changes.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DOCS = Path(__file__).resolve().parent.parent
OUTPUT = DOCS / "images" / "browse.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    """A port of 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_served(url: str, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Return once ``url`` answers 200; fail if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"comfysync browse exited with {server.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not answer within {timeout:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", default="demo", help="path under the server (default: demo)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--size", default="1280,900", help="window WIDTH,HEIGHT")
    args = parser.parse_args()
    chromium = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    if chromium is None:
        sys.exit("Chromium is not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="comfysync-screenshot-") as folder:
        (Path(folder) / "data").mkdir()
        comfysync = [sys.executable, "-m", "pipeline.cli"]
        subprocess.run([*comfysync, "demo"], cwd=folder, check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        server = subprocess.Popen(
            [*comfysync, "browse", "--db", "data/demo.db", "--port", str(port)],
            cwd=folder,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}/{args.page}"
            wait_until_served(url, server)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    "--no-first-run",
                    f"--user-data-dir={folder}/chromium",
                    f"--window-size={args.size}",
                    f"--screenshot={args.output}",
                    url,
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{url} -> {args.output}")


if __name__ == "__main__":
    main()
