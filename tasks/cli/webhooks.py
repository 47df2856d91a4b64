"""`capsule webhooks …`: the provider webhook receiver, and stored events processed now."""

from __future__ import annotations

import argparse

from core.policy import utcnow
from core.webhooks import process_pending
from tasks.cli.common import Command, get_app, whole_number


def cmd_serve(args: argparse.Namespace) -> int:
    # Imported on use: uvicorn and the receiver are slow to import and only this command
    # serves; tasks.webhooks builds the Huey instance from the environment.
    import uvicorn

    from core.receiver import build_receiver
    from tasks.webhooks import process_webhook

    app = get_app()

    def on_stored(event_id: int) -> None:
        process_webhook(event_id)  # enqueued; the backstop covers a lost one

    receiver = build_receiver(app, on_stored, clock=utcnow)
    uvicorn.run(
        receiver,
        host=args.host,
        port=args.port,
        proxy_headers=True,
        forwarded_allow_ips=app.settings.webhook_forwarded_allow_ips,
        log_level="info",
    )
    return 0


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=whole_number(1, 65535), default=8300)


def cmd_process(args: argparse.Namespace) -> int:
    now = utcnow()
    done = process_pending(get_app(), now=now, older_than=now)
    print(f"{done} stored webhook events processed")
    return 0


COMMANDS = (
    Command(
        "webhooks serve",
        cmd_serve,
        "run the webhook receiver (/webhooks/resend, /webhooks/postmark)",
        _serve_arguments,
    ),
    Command("webhooks process", cmd_process, "process every stored, unprocessed event now"),
)
