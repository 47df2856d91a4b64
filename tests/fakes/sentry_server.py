"""A local HTTP server standing in for Sentry: it keeps every byte the SDK sends.

The DSN `http://public@127.0.0.1:PORT/1` makes sentry-sdk post envelopes to
`/api/1/envelope/`. Bodies are kept decompressed (gzip, deflate; brotli if the module is
there) so a test can search them for what must never arrive.
"""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _decode(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]

        return bytes(brotli.decompress(body))
    if encoding in {"", "identity"}:
        return body
    raise ValueError(f"unknown content encoding {encoding!r}")


def parse_envelope(body: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """The items of one envelope: (item header, payload)."""
    items: list[tuple[dict[str, Any], bytes]] = []
    _, _, rest = body.partition(b"\n")
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        length = header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length:].removeprefix(b"\n")
        items.append((header, payload))
    return items


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        raw = self.rfile.read(length)
        body = _decode(raw, self.headers.get("content-encoding", ""))
        with self.server.lock:
            self.server.requests.append((self.path, raw, body))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    lock: threading.Lock
    requests: list[tuple[str, bytes, bytes]]


class FakeSentry:
    """Start it, hand `dsn` to the processes under test, read `events()` and `received()`."""

    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.lock = threading.Lock()
        self.server.requests = []
        port = self.server.server_address[1]
        self.dsn = f"http://public@127.0.0.1:{port}/1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeSentry:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self) -> bytes:
        """Every request body, raw and decompressed, joined: what reached 'Sentry'."""
        with self.server.lock:
            return b"\n".join(raw + b"\n" + body for _, raw, body in self.server.requests)

    def events(self) -> list[dict[str, Any]]:
        """The error events received (envelope items of type "event")."""
        with self.server.lock:
            bodies = [body for _, _, body in self.server.requests]
        return [
            json.loads(payload)
            for body in bodies
            for header, payload in parse_envelope(body)
            if header.get("type") == "event"
        ]
