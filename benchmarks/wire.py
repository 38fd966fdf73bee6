"""The bare-wire floor: every page's bytes over one keep-alive socket, nothing parsed.

    python -m benchmarks.wire --base-url http://127.0.0.1:8811 --token bench-token

This is the physical limit of a sync against a server: one connection, plain HTTP/1.1 GETs of
every page in order, each body read by its Content-Length and thrown away. Only the first
page's ``total`` is read (from the tail of its bytes), to know how many pages there are.
Prints the number of bytes read from the socket.
"""

from __future__ import annotations

import argparse
import socket
from urllib.parse import urlsplit

CHUNK = 256 * 1024


class WireReader:
    """Raw responses off one socket: the head up to its blank line, then Content-Length bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self.bytes_read = 0

    def _fill(self) -> None:
        chunk = self._sock.recv(CHUNK)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-response")
        self.bytes_read += len(chunk)
        self._buffer += chunk

    def response(self, *, keep: bool = False) -> bytes:
        """Read the next response whole; its body if ``keep``; RuntimeError unless a 200."""
        while (end := self._buffer.find(b"\r\n\r\n")) < 0:
            self._fill()
        status_line, *headers = bytes(self._buffer[:end]).split(b"\r\n")
        del self._buffer[: end + 4]
        if status_line[9:12] != b"200":
            raise RuntimeError(f"the server answered {status_line.decode()}")
        length = next(
            int(line[15:]) for line in headers if line[:15].lower() == b"content-length:"
        )
        while len(self._buffer) < length:
            self._fill()
        body = bytes(self._buffer[:length]) if keep else b""
        del self._buffer[:length]
        return body


def total_of(first_page: bytes) -> int:
    """``total`` from a page's tail (``..."total":N}``), without parsing the runners."""
    marker = first_page.rindex(b'"total":') + len(b'"total":')
    return int(first_page[marker:].rstrip(b"} \r\n"))


def read_every_page(base_url: str, token: str, per_page: int) -> int:
    """GET every page over one socket; return the bytes read."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = WireReader(sock)
        head = f"Host: {url.netloc}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()

        def get(number: int, *, keep: bool = False) -> bytes:
            line = f"GET /v1/runner?page={number}&per_page={per_page} HTTP/1.1\r\n"
            sock.sendall(line.encode() + head)
            return reader.response(keep=keep)

        pages = max(1, -(-total_of(get(1, keep=True)) // per_page))
        for number in range(2, pages + 1):
            get(number)
        return reader.bytes_read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token", default="bench-token")
    parser.add_argument("--per-page", type=int, default=100)
    args = parser.parse_args()
    print(read_every_page(args.base_url, args.token, args.per_page))


if __name__ == "__main__":
    main()
