"""`capsule safety …`: the safety nets outside the consumers (reconcile, rollup) and what
watches them (health, exporter, consumer-health)."""

from __future__ import annotations

import argparse
import json
import socket
import threading

from core import health, rollup
from core.db import session_scope
from core.errors import CapsuleError
from core.policy import utcnow
from tasks.cli.common import Command, get_app, settings


def cmd_reconcile(args: argparse.Namespace) -> int:
    # Imported on use (here and below): each is slow to import and serves one command, and
    # every `capsule` start (a container's healthcheck among them) would pay for all of them.
    from core.reconcile import BACKSTOP, DISPATCHER, deliver_inline, run_safety_net

    app = get_app()
    runner = f"cli:{socket.gethostname()}"
    now = utcnow()
    if args.inline and not app.enqueuer.ping():
        count = deliver_inline(app, now=now, clock=utcnow, runner=runner)
        print(json.dumps({"broker": "unreachable", "delivered_inline": count}))
        return 0
    reports = [
        run_safety_net(app, kind, now=now, runner=runner, slot=None, clock=utcnow)
        for kind in (DISPATCHER, BACKSTOP)
    ]
    print(json.dumps([r.__dict__ for r in reports]))
    return 1 if any(r.error_message for r in reports) else 0


def _reconcile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inline",
        action="store_true",
        help="if the broker is unreachable, deliver due letters in this process",
    )


def cmd_health(args: argparse.Namespace) -> int:
    app = get_app()
    with session_scope(app.session_factory) as session:
        report = health.check(session, app.settings, utcnow())
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.ok else 1


def cmd_rollup(args: argparse.Namespace) -> int:
    written = rollup.run(get_app().session_factory, now=utcnow())
    print(json.dumps({"rollups_written": written}))
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    # huey_app builds the Huey instance from the environment: only on use.
    from prometheus_client import CollectorRegistry

    import huey_app
    from core.metrics import DatabaseCollector, serve_metrics

    app = get_app()
    queue = huey_app.huey

    def queue_depth() -> tuple[int | None, int | None]:
        return int(queue.pending_count()), int(queue.scheduled_count())

    registry = CollectorRegistry()
    registry.register(
        DatabaseCollector(app.session_factory, app.settings, clock=utcnow, queue_depth=queue_depth)
    )
    addr = args.addr or app.settings.metrics_addr
    if not serve_metrics(args.port, addr, registry):
        raise CapsuleError(f"cannot listen on {addr}:{args.port}")
    print(f"serving the database gauges on http://{addr}:{args.port}/metrics", flush=True)
    threading.Event().wait()  # until a signal ends the process
    return 0


def _exporter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=9464)
    p.add_argument("--addr", default=None, help="default: CAPSULE_METRICS_ADDR")


def cmd_consumer_health(args: argparse.Namespace) -> int:
    import httpx

    port = args.port or settings().metrics_port
    problems = []
    if not get_app().enqueuer.ping():
        problems.append("broker unreachable")
    if port:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            if "capsule_claims_total" not in body:
                problems.append("the consumer's /metrics does not serve capsule metrics")
        except httpx.HTTPError as exc:
            problems.append(f"the consumer's /metrics on port {port}: {type(exc).__name__}")
    print(json.dumps({"ok": not problems, "problems": problems}))
    return 0 if not problems else 1


def _consumer_health_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=None, help="default: CAPSULE_METRICS_PORT")


COMMANDS = (
    Command(
        "safety reconcile",
        cmd_reconcile,
        "run the dispatcher and the backstop once (for a system cron)",
        _reconcile_arguments,
        aliases=("reconcile",),
    ),
    Command(
        "safety health",
        cmd_health,
        "print the safety nets' health as JSON; exit 1 when unhealthy",
        aliases=("health",),
    ),
    Command(
        "safety rollup",
        cmd_rollup,
        "summarise finished hours and days of sent letters for the console (hourly task)",
        aliases=("rollup",),
    ),
    Command(
        "safety exporter",
        cmd_exporter,
        "serve the database-backed Prometheus gauges (run one per fleet)",
        _exporter_arguments,
        aliases=("exporter",),
    ),
    Command(
        "safety consumer-health",
        cmd_consumer_health,
        "a consumer container's healthcheck: broker reachable and its /metrics answering",
        _consumer_health_arguments,
        aliases=("consumer-health",),
    ),
)
