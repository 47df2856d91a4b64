"""An alert webhook and heartbeat URL on a free localhost port: records every alert posted to
`url` and counts the GETs of `heartbeat_url`; `answer(status)` sets what the posts get back."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.server.posts.append(json.loads(self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()

    def do_GET(self) -> None:
        self.server.heartbeats += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class Webhook:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        self.server.posts = []  # type: ignore[attr-defined]
        self.server.heartbeats = 0  # type: ignore[attr-defined]
        self.server.status = 200  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.heartbeat_url = f"http://127.0.0.1:{self.server.server_address[1]}/ping"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def posts(self) -> list[dict[str, str]]:
        return self.server.posts  # type: ignore[attr-defined, no-any-return]

    @property
    def heartbeats(self) -> int:
        return self.server.heartbeats  # type: ignore[attr-defined, no-any-return]

    def answer(self, status: int) -> None:
        self.server.status = status  # type: ignore[attr-defined]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
