"""The real webhook receiver (core.receiver under uvicorn) in a thread on a free local port,
and the Svix signing a provider does, for tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import uvicorn
from standardwebhooks.webhooks import Webhook

from core.bootstrap import App
from core.policy import utcnow
from core.receiver import Counters, build_receiver

TEST_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_dGhpcyBpcyBub3QgdGhlIHJpZ2h0IHNlY3JldA=="
POSTMARK_USER, POSTMARK_PASSWORD = "postmark", "pm-hook-password"


def svix_headers(
    secret: str, msg_id: str, body: bytes, at: datetime | None = None
) -> dict[str, str]:
    """The headers Resend (Svix) sends with `body`, signed with `secret` at `at`."""
    when = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, when, body.decode())
    return {
        "svix-id": msg_id,
        "svix-timestamp": str(int(when.timestamp())),
        "svix-signature": signature,
        "content-type": "application/json",
    }


class ReceiverServer:
    """uvicorn serving the receiver for `app` on 127.0.0.1; `stored` lists the new event ids."""

    def __init__(self, app: App, on_stored: Callable[[int], None] | None = None) -> None:
        self.stored: list[int] = []
        self.counters = Counters()

        def remember(event_id: int) -> None:
            self.stored.append(event_id)
            if on_stored:
                on_stored(event_id)

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        receiver = build_receiver(app, remember, clock=utcnow, counters=self.counters)
        config = uvicorn.Config(
            receiver, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ReceiverServer:
        self.thread.start()
        deadline = time.monotonic() + 20  # a ceiling; it returns as soon as uvicorn is up
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
