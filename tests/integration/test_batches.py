"""Batch claims and batch sends on SQLite and PostgreSQL (DESIGN.md invariant 9): many due
letters claimed in one statement, one batch row written before the call, a lone letter alone,
twins and stale tasks finding nothing, and every letter in at most one live batch."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from core import batches
from core.bootstrap import App, build_app
from core.claims import Claim, claim
from core.db import make_engine, session_scope
from core.models import Delivery, DeliveryAttempt, DeliveryBatch, ErrorClass, Status
from core.worker import run_delivery
from tests.conftest import T0, RecordingEnqueuer, set_row
from tests.integration.test_transitions import make_user, row, schedule

DUE = T0 + timedelta(minutes=10)
AT_DUE = DUE + timedelta(seconds=1)


def at_due() -> object:
    return AT_DUE


def due_letters(app: App, count: int, at=DUE) -> list[uuid.UUID]:
    owner = make_user(app, credit=count)
    return [schedule(app, owner, at=at, body=f"letter {i}").delivery_id for i in range(count)]


def batch_rows(app: App) -> list[DeliveryBatch]:
    with session_scope(app.session_factory) as session:
        return list(session.scalars(select(DeliveryBatch).order_by(DeliveryBatch.created_at)))


def attempts_of(app: App, ids: list[uuid.UUID]) -> list[DeliveryAttempt]:
    with session_scope(app.session_factory) as session:
        return list(
            session.scalars(select(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(ids)))
        )


def outbox_files(app: App) -> list[Path]:
    """Letters in the outbox (owner notices carry a `-delivery_failed` suffix)."""
    return sorted(p for p in app.settings.outbox_path.glob("*.eml") if "-" not in p.stem)


def test_one_run_claims_the_due_letters_sends_them_in_one_batch_and_their_tasks_find_nothing(
    app: App,
) -> None:
    # Given five letters due at the same instant
    ids = due_letters(app, 5)

    # When the first letter's task runs
    assert run_delivery(app, ids[0], "task-0", clock=lambda: AT_DUE) == Status.SENT

    # Then all five went out in one batch, written with its provider, key and ordered ids
    assert [row(app, i).status for i in ids] == [Status.SENT] * 5
    [batch] = batch_rows(app)
    assert batch.provider == "outbox" and batch.state == "done" and batch.request_sha256
    assert batch.delivery_ids[0] == str(ids[0]) and sorted(batch.delivery_ids) == sorted(
        map(str, ids)
    )
    assert {row(app, i).batch_id for i in ids} == {batch.id}
    tried = attempts_of(app, ids)
    assert len(tried) == 5 and {a.batch_id for a in tried} == {batch.id}
    assert {a.task_id for a in tried} == {"task-0"}
    assert len(outbox_files(app)) == 5
    # And the other letters' own tasks find nothing to claim
    assert [run_delivery(app, i, f"task-{i}", clock=lambda: AT_DUE) for i in ids[1:]] == [None] * 4
    assert len(outbox_files(app)) == 5


def test_a_lone_due_letter_goes_alone_without_a_batch(app: App) -> None:
    [only] = due_letters(app, 1)
    due_letters(app, 2, at=DUE + timedelta(hours=1))  # not due yet

    assert run_delivery(app, only, "t1", clock=lambda: AT_DUE) == Status.SENT

    assert row(app, only).batch_id is None and batch_rows(app) == []
    assert [a.batch_id for a in attempts_of(app, [only])] == [None]


def test_pinned_recovering_and_not_yet_due_letters_are_left_out_of_a_batch(app: App) -> None:
    ids = due_letters(app, 5)
    later = due_letters(app, 1, at=DUE + timedelta(minutes=5))
    set_row(app, ids[3], pinned_provider="outbox")
    set_row(app, ids[4], error_class=ErrorClass.LEASE_EXPIRED)

    run_delivery(app, ids[0], "t1", clock=lambda: AT_DUE)

    [batch] = batch_rows(app)
    assert sorted(batch.delivery_ids) == sorted(map(str, ids[:3]))
    assert [row(app, i).status for i in (ids[3], ids[4], later[0])] == [Status.SCHEDULED] * 3


def test_batch_size_one_sends_each_letter_alone(
    tmp_path: Path, database_url: str, keyring: object
) -> None:
    from core.config import Settings

    settings = Settings(var_dir=str(tmp_path), database_url=database_url, batch_size=1)
    engine = make_engine(settings)
    app = build_app(settings, RecordingEnqueuer(), engine=engine, keyring=keyring)  # type: ignore[arg-type]
    try:
        ids = due_letters(app, 3)
        assert run_delivery(app, ids[0], "t1", clock=lambda: AT_DUE) == Status.SENT
        assert [row(app, i).status for i in ids] == [Status.SENT] + [Status.SCHEDULED] * 2
        assert batch_rows(app) == []
    finally:
        engine.dispose()


def gather(
    app: App,
    own_id: uuid.UUID,
    task_id: str,
    *,
    limit: int,
    lease_seconds: int = 300,
    open_with: str | None = None,
) -> tuple[Claim, list[Claim]]:
    """One run's claim of its own letter and of up to `limit` more, in one transaction; with
    `open_with`, the batch for that provider is opened in it too."""
    with session_scope(app.session_factory) as session:
        own = claim(session, own_id, task_id, now=AT_DUE, lease_seconds=lease_seconds)
        assert own is not None
        more = batches.claim_more(
            session, task_id, limit=limit, now=AT_DUE, lease_seconds=lease_seconds
        )
        if open_with is not None:
            batches.open_batch(session, [own, *more], open_with, now=AT_DUE)
        session.commit()
    return own, more


def test_a_letter_another_run_holds_is_never_claimed_again(app: App) -> None:
    # Given a letter already claimed by another run (processing under its lease)
    ids = due_letters(app, 4)
    with session_scope(app.session_factory) as session:
        held = claim(session, ids[3], "other-run", now=AT_DUE, lease_seconds=300)
        assert held is not None
        session.commit()

    # When a run gathers a batch
    _, more = gather(app, ids[0], "t1", limit=10)

    # Then it takes only the scheduled ones; the held letter keeps its run and its lease
    assert sorted(c.delivery_id for c in more) == sorted(ids[1:3])
    assert row(app, ids[3]).task_id == "other-run"
    assert row(app, ids[3]).attempt_count == 1


# SQLite serialises writers with BEGIN IMMEDIATE; SKIP LOCKED is PostgreSQL's
@pytest.mark.parametrize("db_kind", ["postgresql"], indirect=True)
def test_concurrent_runs_on_postgresql_take_disjoint_letters_without_waiting(
    app: App, db_kind: str
) -> None:
    ids = due_letters(app, 30)
    # the second run's own letter is pinned, so the first run's batch cannot take it (a run
    # whose own row is in another's claim waits for that transaction, then finds nothing)
    set_row(app, ids[1], pinned_provider="outbox")
    taken: dict[str, list[uuid.UUID]] = {}
    first_holds = threading.Event()
    second_done = threading.Event()

    def take(name: str, own: uuid.UUID, hold: bool) -> None:
        with session_scope(app.session_factory) as session:
            mine = claim(session, own, name, now=AT_DUE, lease_seconds=300)
            assert mine is not None
            more = batches.claim_more(session, name, limit=9, now=AT_DUE, lease_seconds=300)
            taken[name] = [mine.delivery_id, *(c.delivery_id for c in more)]
            if hold:
                # keep the row locks until the other run has claimed: it must skip, not wait
                first_holds.set()
                assert second_done.wait(10)
            session.commit()

    first = threading.Thread(target=take, args=("a", ids[0], True))
    first.start()
    assert first_holds.wait(10)
    take("b", ids[1], False)
    second_done.set()
    first.join(10)

    assert len(taken["a"]) == len(taken["b"]) == 10
    assert not set(taken["a"]) & set(taken["b"])


def test_every_letter_is_in_at_most_one_live_batch(app: App) -> None:
    ids = due_letters(app, 6)
    _, more = gather(app, ids[0], "t1", limit=2, open_with="outbox")
    # a member released back to scheduled while its batch is live (kept for a replay)
    member = more[0].delivery_id
    set_row(app, member, status=Status.SCHEDULED)

    _, again = gather(app, ids[5], "t2", limit=10)

    assert member not in {c.delivery_id for c in again}
    assert len(again) == 2  # the two letters in no batch


def test_an_unreadable_letter_fails_alone_and_the_rest_of_its_batch_is_sent(app: App) -> None:
    from core.models import Letter

    ids = due_letters(app, 3)
    with session_scope(app.session_factory) as session:
        letter_id = session.get(Delivery, ids[1]).letter_id  # type: ignore[union-attr]
        session.execute(
            update(Letter).where(Letter.id == letter_id).values(body_ciphertext=b"x" * 40)
        )
        session.commit()

    run_delivery(app, ids[0], "t1", clock=lambda: AT_DUE)

    assert [row(app, i).status for i in ids] == [Status.SENT, Status.FAILED, Status.SENT]
    assert row(app, ids[1]).error_class == ErrorClass.DECRYPTION
    assert len(outbox_files(app)) == 2


def test_a_batch_member_whose_run_died_goes_alone_pinned_to_the_batch_provider(app: App) -> None:
    # Given a batch claimed by a run that died before recording (the backstop recovered it)
    from core.claims import recover_expired_lease

    ids = due_letters(app, 3)
    gather(app, ids[0], "dead", limit=5, lease_seconds=1, open_with="outbox")
    later = AT_DUE + timedelta(seconds=5)
    with session_scope(app.session_factory) as session:
        assert all(recover_expired_lease(session, i, now=later) for i in ids)
        session.commit()

    # When one member's task runs (the outbox can be asked: it looks first)
    assert run_delivery(app, ids[1], "t2", clock=lambda: later) == Status.SENT

    # Then that letter alone went, through the batch's provider, and left the batch
    assert row(app, ids[1]).provider == "outbox"
    assert [row(app, i).status for i in (ids[0], ids[2])] == [Status.SCHEDULED] * 2
    assert len(outbox_files(app)) == 1


def test_replace_keeps_claims_frozen() -> None:
    # dataclasses.replace on Claim is how a member is pinned; a guard against a mutable Claim
    c = Claim(uuid.uuid4(), "t", 1, 1, "k", "a@b.c", uuid.uuid4(), 1, None, None)
    assert replace(c, pinned_provider="x").pinned_provider == "x" and c.pinned_provider is None


def test_the_delivery_detail_names_the_batch_a_letter_went_out_in(app: App) -> None:
    from core.queries.delivery import delivery_detail

    ids = due_letters(app, 3)
    run_delivery(app, ids[0], "t1", clock=lambda: AT_DUE)
    [batch] = batch_rows(app)
    [lone] = due_letters(app, 1)

    with session_scope(app.session_factory) as session:
        detail = delivery_detail(session, ids[2])
        alone = delivery_detail(session, lone)

    assert detail is not None and alone is not None
    assert detail.batch == f"{batch.id} · outbox · 3 letters · done"
    assert list(detail.attempts["batch_id"]) == [str(batch.id)]
    assert alone.batch is None


def test_inline_delivery_counts_every_letter_a_batch_sent(app: App) -> None:
    from core.reconcile import deliver_inline

    due_letters(app, 4)

    sent = deliver_inline(app, now=AT_DUE, clock=lambda: AT_DUE, runner="test")

    assert sent == 4 and len(batch_rows(app)) == 1


def test_letters_already_sent_never_take_a_batch_s_places(app: App) -> None:
    # Given two letters sent long ago (due earlier than anything) and three due now
    early = due_letters(app, 2)
    with session_scope(app.session_factory) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(early))
            .values(status=Status.SENT, next_attempt_at=T0)
        )
        session.commit()
    ids = due_letters(app, 3)

    # When a run gathers two more letters
    _, more = gather(app, ids[0], "t1", limit=2)

    # Then it gets both scheduled ones: the sent rows are not even picked
    assert sorted(c.delivery_id for c in more) == sorted(ids[1:])


def test_on_postgresql_the_companions_queued_tasks_are_revoked(app: App, db_kind: str) -> None:
    # Given four letters due together, each with its task in the broker
    ids = due_letters(app, 4)
    queued = {i: row(app, i).task_id for i in ids}
    assert all(queued.values())

    # When the first one's task leads the batch
    run_delivery(app, ids[0], queued[ids[0]] or "", clock=lambda: AT_DUE)

    # Then (PostgreSQL) the other three tasks are revoked: they would only find nothing
    revoked = app.enqueuer.revoked  # type: ignore[attr-defined]
    if db_kind == "postgresql":
        assert sorted(revoked) == sorted(queued[i] for i in ids[1:])
    else:
        assert revoked == []  # SQLite cannot say which task each letter had; harmless
