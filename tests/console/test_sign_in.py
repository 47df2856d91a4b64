"""The server-side sign-in guard (`core.operators.sign_in`): lockout per account and per client
address kept in the database, the audit event when it locks, and the rehash of old hashes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from core.db import make_session_factory
from core.migrate import upgrade
from core.models import AuditEvent, OperatorCredential, SignInAttempt
from core.operators import (
    Operator,
    Role,
    SignInPolicy,
    hash_fingerprint,
    hash_password,
    needs_rehash,
    sign_in,
)
from tests.console.test_operators import legacy_scrypt_hash

PASSWORD = "correct horse battery"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
POLICY = SignInPolicy(account_failures=3, client_failures=5, window=timedelta(minutes=10))


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path / 'capsule.db'}")
    upgrade(engine)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


@pytest.fixture(scope="module")
def accounts() -> dict[str, Any]:
    digest = hash_password(PASSWORD)
    return {
        name: {"password_hash": digest, "role": "ops", "name": name.title()}
        for name in ("olga", "sam", "vera", "ada", "bob", "cy")
    }


def attempt(
    session: Session,
    accounts: dict[str, Any],
    username: str,
    password: str,
    at: datetime,
    client: str | None = "10.0.0.1",
) -> Any:
    result = sign_in(session, accounts, username, password, client=client, now=at, policy=POLICY)
    session.commit()
    return result


def audit_types(session: Session) -> list[str]:
    return list(session.scalars(select(AuditEvent.type).order_by(AuditEvent.id)))


def test_failures_lock_the_account_then_it_opens_after_the_window(
    session: Session, accounts: dict[str, Any]
) -> None:
    # Given two failures: not locked yet
    for i in range(2):
        assert (
            attempt(session, accounts, "olga", "wrong", T0 + timedelta(seconds=i)).locked_until
            is None
        )
    # When the third fails
    third = attempt(session, accounts, "olga", "wrong", T0 + timedelta(seconds=2))
    # Then the account is locked until the first of those failures leaves the window
    assert third.operator is None and third.locked_until == T0 + timedelta(minutes=10)
    assert audit_types(session) == ["operator.sign_in_locked"]
    # and the right password, from another address, is refused without being checked or counted
    refused = attempt(session, accounts, "olga", PASSWORD, T0 + timedelta(minutes=5), "10.0.0.2")
    assert refused.operator is None and refused.locked_until == T0 + timedelta(minutes=10)
    assert session.scalar(select(func.count()).select_from(SignInAttempt)) == 3
    # Other accounts are not locked
    assert attempt(session, accounts, "sam", PASSWORD, T0 + timedelta(minutes=5)).ok
    # After the window the right password works again
    later = attempt(session, accounts, "olga", PASSWORD, T0 + timedelta(minutes=10, seconds=1))
    assert later.operator == Operator("olga", Role.OPS, "Olga")


def test_a_success_resets_the_account_count(session: Session, accounts: dict[str, Any]) -> None:
    for i in range(2):
        attempt(session, accounts, "olga", "wrong", T0 + timedelta(seconds=i))
    assert attempt(session, accounts, "olga", PASSWORD, T0 + timedelta(seconds=3)).ok
    for i in range(2):
        attempt(session, accounts, "olga", "wrong", T0 + timedelta(seconds=4 + i))
    assert attempt(session, accounts, "olga", PASSWORD, T0 + timedelta(seconds=9)).ok


def test_unknown_names_count_too(session: Session, accounts: dict[str, Any]) -> None:
    for i in range(3):
        result = attempt(session, accounts, "mallory", PASSWORD, T0 + timedelta(seconds=i))
    assert result.locked_until is not None


def test_one_client_trying_many_accounts_is_locked(
    session: Session, accounts: dict[str, Any]
) -> None:
    # Given one address failing once on each of five accounts (no account reaches its limit)
    names = ["olga", "sam", "vera", "ada", "bob"]
    results = [
        attempt(session, accounts, name, "wrong", T0 + timedelta(seconds=i), "203.0.113.9")
        for i, name in enumerate(names)
    ]
    # Then the fifth failure locks the address, even for a right password on a sixth account
    assert results[-1].locked_until == T0 + timedelta(minutes=10)
    assert (
        attempt(
            session, accounts, "cy", PASSWORD, T0 + timedelta(minutes=1), "203.0.113.9"
        ).operator
        is None
    )
    # while the same account from another address still signs in
    assert attempt(session, accounts, "cy", PASSWORD, T0 + timedelta(minutes=1), "198.51.100.1").ok
    event = session.scalars(select(AuditEvent)).one()
    assert (event.type, event.data["locked"], event.data["client"]) == (
        "operator.sign_in_locked",
        "client",
        "203.0.113.9",
    )


def test_an_old_scrypt_hash_is_rehashed_at_the_next_sign_in(session: Session) -> None:
    # Given an account whose secrets entry still holds a scrypt hash
    legacy = legacy_scrypt_hash(PASSWORD)
    accounts = {"olga": {"password_hash": legacy, "role": "ops"}}
    # When olga signs in
    assert attempt(session, accounts, "olga", PASSWORD, T0).ok
    # Then an Argon2id hash of her password is kept, tied to the entry it replaces
    row = session.get(OperatorCredential, "olga")
    assert row is not None and row.replaces == hash_fingerprint(legacy)
    assert row.password_hash.startswith("$argon2id$") and not needs_rehash(row.password_hash)
    assert audit_types(session) == ["operator.password_rehashed"]
    # and it is the hash checked from then on: no second rehash
    assert attempt(session, accounts, "olga", PASSWORD, T0 + timedelta(seconds=1)).ok
    assert audit_types(session) == ["operator.password_rehashed"]  # once


def test_a_replaced_secrets_entry_wins_over_the_stored_rehash(session: Session) -> None:
    accounts = {"olga": {"password_hash": legacy_scrypt_hash(PASSWORD), "role": "ops"}}
    assert attempt(session, accounts, "olga", PASSWORD, T0).ok
    # When an admin gives olga a new password with `capsule operator add`
    accounts["olga"]["password_hash"] = hash_password("a brand new password")
    # Then the old password no longer works, the new one does
    assert not attempt(session, accounts, "olga", PASSWORD, T0 + timedelta(seconds=1)).ok
    assert attempt(session, accounts, "olga", "a brand new password", T0 + timedelta(seconds=2)).ok


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.9", None, [], "203.0.113.9"),  # no proxy: the TCP peer
        ("203.0.113.9", "10.9.9.9", [], "203.0.113.9"),  # an untrusted peer cannot pick one
        ("172.18.0.5", "198.51.100.7", ["172.16.0.0/12"], "198.51.100.7"),
        ("172.18.0.5", "1.1.1.1, 198.51.100.7", ["172.16.0.0/12"], "198.51.100.7"),  # last hop
        ("172.18.0.5", "not-an-ip", ["172.16.0.0/12"], "172.18.0.5"),
        (None, "198.51.100.7", ["127.0.0.1"], "198.51.100.7"),  # a proxy on this machine
        (None, "198.51.100.7", [], None),
    ],
)
def test_the_client_address_behind_a_trusted_proxy(
    peer: str | None, forwarded: str | None, trusted: list[str], expected: str | None
) -> None:
    from console.auth import client_address

    assert client_address(peer, forwarded, trusted) == expected


def test_a_success_prunes_attempts_older_than_a_month(
    session: Session, accounts: dict[str, Any]
) -> None:
    attempt(session, accounts, "sam", "wrong", T0 - timedelta(days=31))
    attempt(session, accounts, "sam", "wrong", T0 - timedelta(days=29))
    assert attempt(session, accounts, "olga", PASSWORD, T0).ok
    kept = session.scalars(select(SignInAttempt.created_at).order_by(SignInAttempt.id)).all()
    assert kept == [T0 - timedelta(days=29), T0]
