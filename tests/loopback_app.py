"""Serve any small ASGI app on a real loopback socket, for upstreams the simulator cannot play.

The simulator answers like the documented API (with faults from its plan); some tests need an
upstream that answers what no fault plan can (a redirect, a `total` of 10**11 on every page),
and still over a real socket so the CLI runs as a subprocess against it.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn


class AppServer:
    """``app`` served by uvicorn on ``host`` (loopback only), port picked by the OS."""

    def __init__(self, app: Any, *, host: str = "127.0.0.1") -> None:
        assert host.startswith("127."), "tests never listen beyond this host"
        self.host = host
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", http="h11", loop="asyncio"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the test server did not start")
            time.sleep(0.005)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> AppServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
