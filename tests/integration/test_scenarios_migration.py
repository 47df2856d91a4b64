"""A migration carrying data: a PostgreSQL database at revision 0001 holding letters in every
state, written with 0001's own columns, is upgraded to head; then the due letters are
delivered by real runs and the others are left exactly as they were."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, MetaData, Table, create_engine, func, insert, select

from benchmarks.fakes.provider_server import FakeProviderServer
from core.bootstrap import build_app
from core.crypto import Keyring
from core.db import session_scope
from core.migrate import alembic_config, current, upgrade
from core.models import CreditEntry, Delivery, Status
from core.reconcile import run_backstop
from core.worker import run_delivery
from tests.conftest import RecordingEnqueuer, fresh_pg_database
from tests.fakes.fixtures import fake_provider_settings

pytestmark = pytest.mark.postgres

T = datetime(2031, 6, 1, 7, 0, tzinfo=UTC)


@pytest.fixture
def old_database() -> Iterator[tuple[Engine, str]]:
    """A fresh PostgreSQL database with the schema at revision 0001."""
    with fresh_pg_database(f"capsule_carry_{uuid.uuid4().hex[:8]}") as url:
        engine = create_engine(url)
        upgrade(engine, "0001")
        yield engine, url
        engine.dispose()


def fill_at_0001(engine: Engine, keyring: Keyring) -> dict[str, uuid.UUID]:
    """One delivery per state, through the tables as revision 0001 made them (reflected)."""
    old = MetaData()
    old.reflect(engine)
    users, letters, deliveries = (old.tables[n] for n in ("users", "letters", "deliveries"))
    ledger, attempts, notices = (
        old.tables[n] for n in ("credit_ledger", "delivery_attempts", "notifications")
    )
    audit = old.tables["audit_events"]
    created = T - timedelta(days=400)
    kinds: dict[str, dict[str, Any]] = {
        "due": {"status": "scheduled", "deliver_at": T - timedelta(minutes=5)},
        "retry": {
            "status": "scheduled",
            "deliver_at": T - timedelta(hours=1),
            "next_attempt_at": T - timedelta(minutes=3),
            "attempt_count": 1,
            "round_attempts": 1,
            "error_class": "transient",
            "last_error": "503 from resend",
        },
        "stuck": {
            "status": "processing",
            "deliver_at": T - timedelta(minutes=20),
            "attempt_count": 1,
            "round_attempts": 1,
            "task_id": "task-of-a-dead-worker",
            "lease_until": T - timedelta(minutes=10),
        },
        "future": {"status": "scheduled", "deliver_at": T + timedelta(days=3650)},
        "sent": {
            "status": "sent",
            "deliver_at": T - timedelta(days=2),
            "attempt_count": 1,
            "round_attempts": 1,
            "provider": "resend",
            "provider_message_id": "re-msg-1",
            "sent_at": T - timedelta(days=2),
        },
        "failed": {
            "status": "failed",
            "deliver_at": T - timedelta(days=1),
            "attempt_count": 1,
            "round_attempts": 1,
            "error_class": "permanent",
            "last_error": "422 invalid recipient",
            "failed_at": T - timedelta(days=1),
        },
        "canceled": {
            "status": "canceled",
            "deliver_at": T + timedelta(days=10),
            "canceled_at": T - timedelta(days=5),
        },
    }
    ids: dict[str, uuid.UUID] = {}
    with engine.begin() as conn:
        user_id = conn.execute(
            insert(users)
            .values(email="owner@example.com", name="Owner", created_at=created)
            .returning(users.c.id)
        ).scalar_one()
        conn.execute(
            insert(ledger).values(user_id=user_id, amount=10, reason="grant", created_at=created)
        )
        for kind, values in kinds.items():
            letter_id, delivery_id = uuid.uuid4(), uuid.uuid4()
            sealed = keyring.seal(letter_id, f"Subject {kind}", f"Dear future me ({kind})")
            conn.execute(
                insert(letters).values(
                    id=letter_id,
                    user_id=user_id,
                    key_id=sealed.key_id,
                    subject_ciphertext=sealed.subject,
                    body_ciphertext=sealed.body,
                    created_at=created,
                )
            )
            row = {
                "attempt_count": 0,
                "round_attempts": 0,
                "next_attempt_at": values["deliver_at"],
                "version": values.get("attempt_count", 0) + 1,
                **values,
            }
            conn.execute(
                insert(deliveries).values(
                    id=delivery_id,
                    letter_id=letter_id,
                    user_id=user_id,
                    recipient_email=f"{kind}@example.com",
                    idempotency_key=uuid.uuid4().hex,
                    created_at=created,
                    updated_at=created,
                    **row,
                )
            )
            ledger_row = {"user_id": user_id, "delivery_id": delivery_id, "created_at": created}
            conn.execute(insert(ledger).values(amount=-1, reason="reserve", **ledger_row))
            if kind in {"failed", "canceled"}:
                conn.execute(insert(ledger).values(amount=1, reason="refund", **ledger_row))
            if row["attempt_count"]:
                conn.execute(
                    insert(attempts).values(
                        delivery_id=delivery_id,
                        run_number=1,
                        task_id="t-old",
                        provider="resend",
                        outcome="sent" if kind == "sent" else "transient",
                        duration_ms=120,
                        started_at=values["deliver_at"],
                    )
                )
            conn.execute(
                insert(audit).values(
                    type="delivery.scheduled",
                    actor="owner@example.com",
                    delivery_id=delivery_id,
                    data={"deliver_at": values["deliver_at"].isoformat()},
                    created_at=created,
                )
            )
            ids[kind] = delivery_id
        conn.execute(
            insert(notices).values(
                delivery_id=ids["failed"],
                user_id=user_id,
                kind="delivery_failed",
                status="sent",
                idempotency_key="failed-notice",
                requested_by="system",
                attempts=1,
                created_at=T - timedelta(days=1),
                sent_at=T - timedelta(days=1),
            )
        )
    return ids


def snapshot(engine: Engine, table: Table) -> dict[Any, tuple[Any, ...]]:
    """Every row of `table`, by its 0001 columns only."""
    with engine.connect() as conn:
        return {row[0]: tuple(row) for row in conn.execute(select(table))}


def test_letters_in_every_state_survive_the_upgrade_to_head_and_the_due_ones_are_delivered(
    old_database: tuple[Engine, str],
    keyring: Keyring,
    provider_server: FakeProviderServer,
    tmp_path: Path,
) -> None:
    engine, url = old_database

    # Given a database at 0001 with letters in every state, written with 0001's columns
    assert current(engine) == "0001"
    ids = fill_at_0001(engine, keyring)
    old = MetaData()
    old.reflect(engine)
    old.remove(old.tables["alembic_version"])
    before = {name: snapshot(engine, table) for name, table in old.tables.items()}

    # When it is upgraded to the newest revision
    upgrade(engine)
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert current(engine) == head

    # Then every row of every 0001 table is still there, unchanged in its 0001 columns
    assert {name: snapshot(engine, table) for name, table in old.tables.items()} == before

    # When the safety net and real delivery runs work on it at T
    settings = fake_provider_settings(
        provider_server, tmp_path, database_url=url, providers=("resend",), grace_seconds=60
    )
    enqueuer = RecordingEnqueuer()
    app = build_app(settings, enqueuer, keyring=keyring)
    try:
        report = run_backstop(app, now=T)
        assert (report.found, report.recovered, report.errors) == (3, 1, 0)
        # (the first run may take the others along in its batch; their own runs find nothing)
        runs = [
            run_delivery(app, delivery_id, task_id, clock=lambda: T)
            for delivery_id, _eta, task_id in list(enqueuer.enqueued)
        ]
        assert Status.SENT in runs and set(runs) <= {Status.SENT, None}, runs
        assert run_delivery(app, ids["future"], "early", clock=lambda: T) is None

        # Then the three that were due are sent, each once, with the text sealed before
        with session_scope(app.session_factory) as session:
            rows = {r.id: r for r in session.scalars(select(Delivery))}
            balance = session.scalar(select(func.sum(CreditEntry.amount)))
    finally:
        app.engine.dispose()
    for kind in ("due", "retry", "stuck"):
        row = rows[ids[kind]]
        assert (row.status, row.sent_at, row.provider) == (Status.SENT, T, "resend"), kind
        assert len(provider_server.messages_for_delivery(str(row.id))) == 1, kind
    # one request per run that claimed something: one batch, or one per letter
    assert 1 <= provider_server.stats()["requests"]["resend"] <= 3
    texts = sorted(m.text for m in provider_server.messages())
    assert texts == [f"Dear future me ({k})" for k in ("due", "retry", "stuck")]

    # And the others are as they were: the future one waits, history is untouched
    untouched = {ids[k] for k in ("future", "sent", "failed", "canceled")}
    after = snapshot(engine, old.tables["deliveries"])
    assert {i: after[i] for i in untouched} == {i: before["deliveries"][i] for i in untouched}
    assert rows[ids["future"]].status == Status.SCHEDULED
    assert snapshot(engine, old.tables["notifications"]) == before["notifications"]
    assert balance == 10 - 7 + 2
