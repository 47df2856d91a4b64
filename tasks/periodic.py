"""Periodic tasks. Every consumer schedules them. The safety nets run once across all
consumers (the single-runner lock and the once-per-slot record in core.reconcile); the rollup
may run on several at once, and a row already written is kept.

Besides the minute's runs, each consumer process watches the broker's marker from a thread
started by a Huey startup hook: Huey's scheduler has no per-tick hook, and a periodic task
fires at most once a minute. A wiped broker is noticed within CAPSULE_MARKER_CHECK_SECONDS.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from huey import crontab

from core import metrics
from core import rollup as rollups
from core.policy import utcnow
from core.reconcile import (
    BACKSTOP,
    DISPATCHER,
    FAILED_RETRIER,
    redispatch_if_marker_lost,
    run_safety_net,
    slot_for,
)
from tasks.delivery import get_app
from tasks.queue import huey, settings

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------- marker watch

_watch_lock = threading.Lock()
_watch: threading.Thread | None = None
_stop = threading.Event()


def _watch_marker(interval: float) -> None:
    runner = f"{socket.gethostname()}:{os.getpid()}"  # the worker's pid, after any fork
    while not _stop.wait(interval):
        try:
            redispatch_if_marker_lost(get_app(), now=utcnow(), runner=runner, clock=utcnow)
        except Exception:  # never let the watch die: the next tick tries again
            log.exception("marker check failed")


@huey.on_startup(name="capsule.marker_watch")
def start_marker_watch() -> None:
    """Start this process's marker watch once (Huey calls the hook in every worker)."""
    global _watch
    interval = settings.marker_check_seconds
    if interval <= 0:
        return
    with _watch_lock:
        if _watch is not None and _watch.is_alive():
            return
        _stop.clear()
        _watch = threading.Thread(
            target=_watch_marker, args=(interval,), name="capsule-marker-watch", daemon=True
        )
        _watch.start()


@huey.on_shutdown(name="capsule.marker_watch")
def stop_marker_watch() -> None:
    _stop.set()
