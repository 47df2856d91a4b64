"""A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps what it receives.

Faults are queued per stage ("mail", "rcpt", "data") and used once each:

    server.fail_next("rcpt", "550 5.1.1 No such user")     a reply instead of 250
    server.fail_next("data", "451 4.3.0 Try again later")
    server.fail_next("data", "stall", seconds=3)           store the message, answer late
    server.fail_next("data", "drop")                       store the message, hang up

Standalone: `python -m tests.fakes.smtp_server --port 2525` prints host:port and serves until
SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller

STAGES = ("mail", "rcpt", "data")


@dataclass(frozen=True)
class ReceivedMail:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None
    subject: str | None
    headers: dict[str, str]
    text: str
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class _Fault:
    reply: str  # an SMTP reply line, or "stall" / "drop"
    seconds: float = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _parse(envelope: Any) -> ReceivedMail:
    raw = bytes(envelope.original_content or envelope.content)
    message = email.message_from_bytes(raw, policy=default_policy)
    assert isinstance(message, EmailMessage)
    body = message.get_body(preferencelist=("plain",))
    text = body.get_content() if isinstance(body, EmailMessage) else ""
    return ReceivedMail(
        mail_from=str(envelope.mail_from),
        rcpt_tos=tuple(envelope.rcpt_tos),
        message_id=message.get("Message-ID"),
        subject=message.get("Subject"),
        headers={k: str(v) for k, v in message.items()},
        text=text,
        raw=raw,
    )


class _Handler:
    def __init__(self, owner: FakeSmtpServer) -> None:
        self._owner = owner

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        fault = self._owner.take_fault("mail")
        if fault is not None:
            return fault.reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        fault = self._owner.take_fault("rcpt")
        if fault is not None:
            return fault.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        fault = self._owner.take_fault("data")
        if fault is not None and fault.reply not in {"stall", "drop"}:
            return fault.reply
        self._owner.store(_parse(envelope))
        if fault is not None and fault.reply == "stall":
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.reply == "drop":
            server.transport.close()
        return "250 Message accepted for delivery"


class FakeSmtpServer:
    """aiosmtpd in a background thread; `messages` holds what it accepted."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._messages: list[ReceivedMail] = []
        self._faults: dict[str, deque[_Fault]] = {stage: deque() for stage in STAGES}
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    def start(self) -> FakeSmtpServer:
        self._controller = Controller(
            _Handler(self), hostname=self.host, port=self.port, ready_timeout=5
        )
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop serving; later connections to the port are refused."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def __enter__(self) -> FakeSmtpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, stage: str, reply: str, *, seconds: float = 5.0) -> None:
        """Answer the next `stage` command with `reply` (or "stall" / "drop" for data)."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}")
        with self._lock:
            self._faults[stage].append(_Fault(reply, seconds))

    def take_fault(self, stage: str) -> _Fault | None:
        with self._lock:
            return self._faults[stage].popleft() if self._faults[stage] else None

    def store(self, mail: ReceivedMail) -> None:
        with self._lock:
            self._messages.append(mail)

    @property
    def messages(self) -> list[ReceivedMail]:
        with self._lock:
            return list(self._messages)

    def by_message_id(self, message_id: str) -> list[ReceivedMail]:
        return [m for m in self.messages if m.message_id == message_id]

    def reset(self) -> None:
        with self._lock:
            self._messages.clear()
            for queue in self._faults.values():
                queue.clear()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake SMTP server (aiosmtpd).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeSmtpServer(args.host, args.port).start()
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    print(f"{server.host}:{server.port}", flush=True)
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()
