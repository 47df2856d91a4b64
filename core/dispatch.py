"""The one seam between the domain and the task broker.

Core never imports Huey. It asks an `Enqueuer` to put "deliver this id at that time" into the
broker and gets back the task id, which it stores on the row as the current dispatch. The
broker is lossy, so nothing here depends on the task surviving: a failed enqueue leaves the row
for the dispatcher or the backstop (DESIGN.md invariant 3).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from core.db import SessionFactory, session_scope
from core.errors import EnqueueError
from core.models import Delivery, Status

log = logging.getLogger(__name__)


class Enqueuer(Protocol):
    def enqueue(self, delivery_id: uuid.UUID, eta: datetime) -> str:
        """Put a deliver task in the broker; return its task id. Raises EnqueueError."""
        ...

    def revoke(self, task_id: str) -> None:
        """Best effort: stop a queued task from running."""
        ...

    def ping(self) -> bool:
        """True when the broker answers."""
        ...

    def has_marker(self) -> bool:
        """True while the broker still holds the marker `set_marker` left in it.

        A broker that lost its data (flushed, restarted without persistence, replaced) has
        lost the marker too, and with it every queued task: the dispatcher then dispatches
        again everything due within the horizon instead of waiting for the backstop.
        """
        ...

    def set_marker(self) -> None: ...


def dispatch(
    session_factory: SessionFactory,
    enqueuer: Enqueuer,
    delivery_id: uuid.UUID,
    eta: datetime,
    now: datetime,
) -> str | None:
    """Enqueue the delivery and record the dispatch; None when the broker failed.

    The task id is stored only while the row is still scheduled: a dispatch that lost a race
    with a cancel or a claim records nothing (its task will find nothing to claim).
    """
    try:
        task_id = enqueuer.enqueue(delivery_id, eta)
    except EnqueueError as exc:
        log.warning("enqueue failed; the dispatcher will retry: %s", exc)
        return None
    try:
        with session_scope(session_factory) as session:
            session.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.status == Status.SCHEDULED)
                .values(task_id=task_id, dispatched_at=now)
            )
            session.commit()
    except SQLAlchemyError as exc:
        # The task is queued and will claim the row; only the bookkeeping is missing, and the
        # dispatcher may queue a harmless twin that finds nothing to claim.
        log.warning("could not record dispatch %s of %s: %s", task_id, delivery_id, exc)
    return task_id


def dispatch_many(
    session_factory: SessionFactory,
    enqueuer: Enqueuer,
    rows: Sequence[tuple[uuid.UUID, datetime]],
    now: datetime,
) -> tuple[int, int]:
    """Enqueue each (delivery id, eta) and record all the dispatches in one statement.

    For rows found with no dispatch (the dispatcher's): a dispatch is recorded only while the
    row is still scheduled with no other dispatch recorded meanwhile (a retry's own). One
    statement and one commit for the lot is what lets a broker wipe be repaired in seconds:
    a commit per row took the dispatcher ~20 ms a letter on a loaded machine.
    Returns (enqueued, refused by the broker).
    """
    done: list[dict[str, Any]] = []
    refused = 0
    for delivery_id, eta in rows:
        try:
            task_id = enqueuer.enqueue(delivery_id, eta)
        except EnqueueError as exc:
            log.warning("enqueue failed; the dispatcher will retry: %s", exc)
            refused += 1
            continue
        done.append({"id": delivery_id, "task_id": task_id, "dispatched_at": now})
    if done:
        try:
            with session_scope(session_factory) as session:
                session.execute(
                    update(Delivery)
                    .where(Delivery.status == Status.SCHEDULED, Delivery.task_id.is_(None))
                    .execution_options(synchronize_session=None),
                    done,
                )
                session.commit()
        except SQLAlchemyError as exc:
            # As in `dispatch`: the tasks are queued and will claim their rows.
            log.warning("could not record %d dispatches: %s", len(done), exc)
    return len(done), refused


def revoke_quietly(enqueuer: Enqueuer, task_id: str | None) -> None:
    if not task_id:
        return
    try:
        enqueuer.revoke(task_id)
    except Exception as exc:  # the claim check makes a surviving task harmless
        log.warning("could not revoke task %s: %s", task_id, exc)
