"""Periodic tasks. Every consumer schedules them. The safety nets run once across all
consumers (the single-runner lock and the once-per-slot record in core.reconcile); the rollup
may run on several at once, and a row already written is kept."""

from __future__ import annotations

import os
import socket

from huey import crontab

from core import metrics
from core import rollup as rollups
from core.policy import utcnow
from core.reconcile import BACKSTOP, DISPATCHER, FAILED_RETRIER, run_safety_net, slot_for
from huey_app import huey
from tasks.runtime import get_app

RUNNER = f"{socket.gethostname()}:{os.getpid()}"


def _run(kind: str) -> None:
    now = utcnow()
    try:
        report = run_safety_net(
            get_app(), kind, now=now, runner=RUNNER, slot=slot_for(kind, now), clock=utcnow
        )
    except Exception:
        metrics.observe_safety_net(kind, ran=True, error=True)
        raise
    metrics.observe_safety_net(kind, ran=report.ran, error=report.error_message is not None)


@huey.periodic_task(crontab(minute="*"), name="capsule.dispatcher")
def dispatcher() -> None:
    _run(DISPATCHER)


@huey.periodic_task(crontab(minute="*"), name="capsule.backstop")
def backstop() -> None:
    _run(BACKSTOP)


@huey.periodic_task(crontab(minute="17"), name="capsule.failed_retrier")
def failed_retrier() -> None:
    _run(FAILED_RETRIER)


@huey.periodic_task(crontab(minute="20"), name="capsule.rollup")
def rollup() -> None:
    rollups.run(get_app().session_factory, now=utcnow())
