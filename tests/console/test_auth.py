"""Sign-in and roles: local accounts, OIDC with a role table, demo mode, and what each role sees."""

from __future__ import annotations

import re

import pytest
from streamlit.testing.v1 import AppTest

from core.operators import Operator, Role, hash_password
from tests.console.conftest import ENTRY, PASSWORD, ROOT, Runner, Seams
from tests.console.markdown import plain

VIEWER = Operator("vera", Role.VIEWER, "Vera")
SUPPORT = Operator("sam", Role.SUPPORT, "Sam")
OPS = Operator("olga", Role.OPS, "Olga")


def nav_titles(at: AppTest) -> list[str]:
    """The page links st.navigation registered for this session."""
    return sorted(str(info.get("page_name")) for info in at._registered_pages.values())


def sign_in(at: AppTest, username: str, password: str) -> AppTest:
    at.text_input(key="login_username").input(username)
    at.text_input(key="login_password").input(password)
    return at.button[0].click().run()


def test_local_sign_in(console: Runner) -> None:
    # Given the sign-in page
    at = console()
    assert at.title[0].value.endswith("Capsule console")

    # When a wrong password is tried, then the right one
    sign_in(at, "sam", "not the password")
    assert [plain(e.value) for e in at.error] == ["Unknown username or wrong password."]
    sign_in(at, "sam", PASSWORD)

    # Then the support operator is in, with every page but the ops one
    assert not at.error
    assert "**Sam**" in at.sidebar.markdown[0].value
    assert "support" in at.sidebar.markdown[0].value
    assert at.title[0].value == "Overview"
    assert "Bulk operations" not in nav_titles(at) and "Triage" in nav_titles(at)


def test_lockout_holds_across_browser_sessions(console: Runner) -> None:
    # Given five wrong passwords for olga in one browser session
    first = console()
    for _ in range(4):
        sign_in(first, "olga", "not the password")
        assert [e.value for e in first.error] == ["Unknown username or wrong password."]
    sign_in(first, "olga", "not the password")
    assert "Too many failed sign-ins" in first.error[0].value

    # When a fresh session (a new browser, cookies cleared) tries the right password
    second = console()
    sign_in(second, "olga", PASSWORD)

    # Then it is refused too, and the lockout is in the audit log
    assert re.fullmatch(
        r"Too many failed sign-ins\. Try again in 1[45] min \d+ s\.", second.error[0].value
    )
    assert second.title[0].value.endswith("Capsule console")
    assert locked_events() == [("operator.sign_in_locked", "olga")]
    # while another account still signs in
    sign_in(second, "sam", PASSWORD)
    assert second.title[0].value == "Overview"


def locked_events() -> list[tuple[str, str]]:
    from sqlalchemy import select

    from console.data import get_app
    from core.db import session_scope
    from core.models import AuditEvent

    with session_scope(get_app().session_factory) as s:
        rows = s.execute(
            select(AuditEvent.type, AuditEvent.actor).where(AuditEvent.type.like("operator.%"))
        )
        return [(t, a) for t, a in rows]


@pytest.mark.parametrize(
    ("change", "signed_out"),
    [("remove", True), ("demote", False), ("new_password", True), ("unknown_role", True)],
)
def test_a_changed_account_takes_effect_on_the_next_page_run(
    console: Runner, password_hash: str, change: str, signed_out: bool
) -> None:
    # Given olga signed in as ops, on the bulk page
    at = console()
    sign_in(at, "olga", PASSWORD)
    at.switch_page("views/bulk.py").run()
    assert at.title[0].value == "Bulk operations"

    # When an admin changes her entry in the secrets file
    entry = at.secrets["operators"]["olga"]
    if change == "remove":
        del at.secrets["operators"]["olga"]
    elif change == "demote":
        entry["role"] = "viewer"
    elif change == "new_password":
        entry["password_hash"] = hash_password("another password entirely")
    else:
        entry["role"] = "root"
    at.run()

    # Then her very next page run already sees it
    assert not at.exception
    if signed_out:
        assert at.title[0].value.endswith("Capsule console")
        assert at.text_input(key="login_username")
    else:
        assert "Bulk operations" not in nav_titles(at)
        assert "viewer" in at.sidebar.markdown[0].value


def test_no_accounts_explains_setup(console_env: Seams) -> None:
    at = AppTest.from_file(ENTRY, default_timeout=30).run()
    assert "capsule operator add" in at.info[0].value


def test_sign_out(console: Runner) -> None:
    at = console(OPS)
    at.sidebar.button(key="sign_out").click().run()
    assert at.title[0].value.endswith("Capsule console")


@pytest.mark.parametrize(
    ("email", "expected"),
    [("Olga@Example.com", "ops"), ("vera@example.com", "viewer"), ("eve@example.com", None)],
)
def test_oidc_roles_from_the_roles_table(
    console_env: Seams, email: str, expected: str | None
) -> None:
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["auth"] = {"redirect_uri": "http://localhost/oauth2callback", "cookie_secret": "x"}
    at.secrets["roles"] = {"olga@example.com": "ops", "vera@example.com": "viewer"}
    at.user = {"is_logged_in": True, "email": email, "name": "Someone", "email_verified": True}
    at.run()
    assert not at.exception
    if expected is None:
        assert "has no console role" in at.error[0].value
        return
    assert f"{expected}-badge" in " ".join(m.value for m in at.sidebar.markdown) or (
        f"[{expected}]" in " ".join(m.value for m in at.sidebar.markdown)
    )
    assert ("Bulk operations" in nav_titles(at)) is (expected == "ops")


@pytest.mark.parametrize("verified", [False, "false", None])
def test_oidc_needs_a_verified_email(console_env: Seams, verified: object) -> None:
    # Given an identity provider that lets users set an email it has not verified
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["auth"] = {"redirect_uri": "http://localhost/oauth2callback", "cookie_secret": "x"}
    at.secrets["roles"] = {"olga@example.com": "ops"}
    user = {"is_logged_in": True, "email": "olga@example.com", "name": "Not Olga"}
    if verified is not None:
        user["email_verified"] = verified
    at.user = user
    at.run()
    # Then the listed address gives no role, and the page says why
    assert not at.exception
    assert plain(at.error[0].value).startswith(
        "Your identity provider has not verified olga@example.com, so it gives no console role."
    )
    assert "Bulk operations" not in nav_titles(at)


def test_oidc_accepts_the_string_true(console_env: Seams) -> None:
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["auth"] = {"redirect_uri": "http://localhost/oauth2callback", "cookie_secret": "x"}
    at.secrets["roles"] = {"olga@example.com": "ops"}
    at.user = {"is_logged_in": True, "email": "olga@example.com", "email_verified": "true"}
    at.run()
    assert not at.exception and "Bulk operations" in nav_titles(at)


def test_oidc_signed_out_offers_sign_in(console_env: Seams) -> None:
    at = AppTest.from_file(ENTRY, default_timeout=30)
    at.secrets["auth"] = {"redirect_uri": "http://localhost/oauth2callback", "cookie_secret": "x"}
    at.user = {"is_logged_in": False}
    at.run()
    assert [b.label for b in at.button] == ["Sign in with your company account"]


def test_demo_mode_signs_in_as_demo_ops(
    console_env: Seams, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPSULE_DEMO_MODE", "true")
    at = AppTest.from_file(ENTRY, default_timeout=30).run()
    assert "Demo mode" in at.warning[0].value
    assert "Bulk operations" in nav_titles(at)
    assert not at.sidebar.button  # nothing to sign out of


@pytest.mark.parametrize("providers", ["resend", "outbox,smtp", "smtp"])
def test_demo_mode_refuses_real_providers(
    console_env: Seams, monkeypatch: pytest.MonkeyPatch, providers: str
) -> None:
    # Given demo mode (no sign-in) pointed at a provider that reaches real inboxes
    monkeypatch.setenv("CAPSULE_DEMO_MODE", "true")
    monkeypatch.setenv("CAPSULE_PROVIDERS", providers)
    monkeypatch.setenv("CAPSULE_RESEND_API_KEY", "re_test")
    monkeypatch.setenv("CAPSULE_SMTP_HOST", "127.0.0.1")
    at = AppTest.from_file(ENTRY, default_timeout=30).run()
    # Then the console stops at once with one clear line, and shows no page
    assert not at.exception
    assert [plain(e.value) for e in at.error] == [
        "The console cannot start: CAPSULE_DEMO_MODE: demo mode sends only to the file "
        f"outbox: set CAPSULE_PROVIDERS=outbox (got {providers})"
    ]
    assert not at.title and not at.text_input and not at.sidebar.markdown


def test_make_run_binds_the_console_to_this_machine_only() -> None:
    makefile = (ROOT / "Makefile").read_text()
    run = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    console_line = next(line for line in run.splitlines() if "streamlit run" in line)
    assert "CAPSULE_DEMO_MODE=true" in console_line
    assert "--server.address 127.0.0.1" in console_line


def test_a_viewer_sees_no_action_buttons(console: Runner) -> None:
    at = console(VIEWER, page="triage")
    labels = {b.label for b in at.button}
    assert not labels & {"Requeue", "Cancel", "Notify owner"}
    assert "read-only" in at.info[0].value
    assert "Bulk operations" not in nav_titles(at)
    with pytest.raises(ValueError):
        at.switch_page("views/bulk.py")


def test_support_sees_the_action_buttons(console: Runner) -> None:
    at = console(SUPPORT, page="triage")
    assert {"Requeue", "Cancel", "Notify owner"} <= {b.label for b in at.button}
