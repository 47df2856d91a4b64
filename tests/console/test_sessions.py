"""Sign-in that survives a new tab: signed, expiring session tokens kept server-side
(`core.sessions`, on SQLite and PostgreSQL), and the console resuming, re-checking and revoking
them (AppTest; a "new tab" is a fresh AppTest whose browser sends the cookie)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, select
from streamlit.testing.v1 import AppTest

from core import sessions
from core.bootstrap import App
from core.db import make_session_factory, session_scope
from core.models import ConsoleSession
from core.operators import hash_password
from tests.conftest import T0
from tests.console.conftest import ENTRY, PASSWORD, Runner, Seams, accounts
from tests.console.test_auth import sign_in

KEY = b"k" * 32
HOUR = timedelta(hours=1)


def issue(app: App, username: str = "sam", ttl: timedelta = HOUR) -> str:
    with session_scope(app.session_factory) as s:
        token = sessions.issue(s, username=username, fingerprint="f" * 64, key=KEY, now=T0, ttl=ttl)
        s.commit()
    return token


def resume(app: App, token: str, *, at: timedelta = timedelta(0), key: bytes = KEY) -> str | None:
    with session_scope(app.session_factory) as s:
        found = sessions.resume(s, token, key=key, now=T0 + at)
    return found.username if found else None


def test_a_token_resumes_its_session_until_it_expires(app: App) -> None:
    token = issue(app)
    assert resume(app, token) == "sam"
    assert resume(app, token, at=HOUR - timedelta(seconds=1)) == "sam"
    assert resume(app, token, at=HOUR) is None
    with session_scope(app.session_factory) as s:
        row = s.scalars(select(ConsoleSession)).one()
    assert token.split(".")[1] not in row.secret_hash  # only a digest of the secret is stored


def test_forged_or_edited_tokens_resume_nothing(app: App) -> None:
    token = issue(app)
    sid, secret, expires, signature = token.split(".")
    later = str(int(expires) + 86400)
    # a signature for a secret the database never saw (as if the key leaked, not the row)
    other = f"{sid}.{'A' * len(secret)}.{expires}"
    resigned = f"{other}.{sessions._sign(KEY, other)}"
    for bad in (
        f"{sid}.{secret}.{later}.{signature}",  # a longer life, same signature
        f"{sid}.{secret}.{expires}.{signature[:-1]}x",
        f"{sid}x.{secret}.{expires}.{signature}",
        resigned,
        "",
        "a.b.c",
        "." * 3,
        token + "." + token,
    ):
        assert resume(app, bad) is None, bad
    assert resume(app, token, key=b"another key entirely........") is None
    assert resume(app, token) == "sam"


def test_revoked_sessions_stay_revoked(app: App) -> None:
    token, other = issue(app), issue(app, "olga")
    with session_scope(app.session_factory) as s:
        assert sessions.revoke(s, token, key=KEY, now=T0) is True
        assert sessions.revoke(s, token, key=KEY, now=T0) is False
        s.commit()
    assert resume(app, token) is None
    assert resume(app, other) == "olga"  # only that session


def test_issue_refuses_a_lifetime_of_nothing(app: App) -> None:
    with session_scope(app.session_factory) as s, pytest.raises(ValueError):
        sessions.issue(s, username="sam", fingerprint="f", key=KEY, now=T0, ttl=timedelta(0))


# ---------------------------------------------------------------- the console


def new_tab(password_hash: str, cookie: str | None, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """A new browser tab: no session state, only the cookie the browser sends."""
    import console.auth

    monkeypatch.setattr(console.auth, "browser_token", lambda: cookie)
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["operators"] = accounts(password_hash)
    return at.run()


def signed_in_as(at: AppTest) -> str | None:
    if at.title and at.title[0].value.endswith("Capsule console"):
        return None
    return str(at.sidebar.markdown[0].value)


def cookie_scripts(at: AppTest) -> list[str]:
    return [str(h.proto.body) for h in at.get("html")]


def sessions_rows() -> list[ConsoleSession]:
    engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    try:
        with session_scope(make_session_factory(engine)) as s:
            return list(s.scalars(select(ConsoleSession)))
    finally:
        engine.dispose()


def test_sign_in_survives_a_new_tab_and_sign_out_ends_every_tab(
    console: Runner, password_hash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given sam signs in: a session row, and a script that stores its token in a cookie
    first = sign_in(console(), "sam", PASSWORD)
    token = first.session_state["_session_token"]
    (row,) = sessions_rows()
    assert (row.username, row.revoked_at) == ("sam", None)
    (script,) = cookie_scripts(first)
    assert f'"capsule_session=" + "{token}"' in script and "SameSite=Strict" in script

    # When a new tab connects with that cookie, it is signed in without asking
    tab = new_tab(password_hash, token, monkeypatch)
    assert "**Sam**" in (signed_in_as(tab) or "")

    # When sam signs out in the first tab
    first.sidebar.button(key="sign_out").click().run()
    assert signed_in_as(first) is None
    assert any("Max-Age=0" in s for s in cookie_scripts(first))
    assert sessions_rows()[0].revoked_at is not None

    # Then the other tab is out at its next click, and the cookie opens nothing any more
    tab.run()
    assert signed_in_as(tab) is None
    assert signed_in_as(new_tab(password_hash, token, monkeypatch)) is None


def test_a_session_ends_when_the_password_is_replaced(
    console: Runner, password_hash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = sign_in(console(), "olga", PASSWORD).session_state["_session_token"]
    import console.auth as console_auth

    monkeypatch.setattr(console_auth, "browser_token", lambda: token)
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["operators"] = accounts(password_hash)
    at.secrets["operators"]["olga"]["password_hash"] = hash_password("another password entirely")
    at.run()
    assert signed_in_as(at) is None


def test_a_forged_cookie_opens_nothing(
    console_env: Seams, password_hash: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = new_tab(password_hash, "abc.def.99999999999.forged", monkeypatch)
    assert signed_in_as(at) is None
    assert not at.exception
