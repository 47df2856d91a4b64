"""Sign-in and roles: local accounts, OIDC with a role table, demo mode, and what each role sees."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from core.operators import Operator, Role
from tests.console.conftest import ENTRY, PASSWORD, Runner, Seams

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
    assert [e.value for e in at.error] == ["Unknown username or wrong password."]
    sign_in(at, "sam", PASSWORD)

    # Then the support operator is in, with every page but the ops one
    assert not at.error
    assert "**Sam**" in at.sidebar.markdown[0].value
    assert "support" in at.sidebar.markdown[0].value
    assert at.title[0].value == "Overview"
    assert "Bulk operations" not in nav_titles(at) and "Triage" in nav_titles(at)


def test_unknown_user_and_lockout(console: Runner) -> None:
    at = console()
    for _ in range(5):
        sign_in(at, "mallory", PASSWORD)
    sign_in(at, "olga", PASSWORD)  # right password, but the session is locked out
    assert "Too many failed attempts" in at.error[0].value
    assert at.title[0].value.endswith("Capsule console")


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
    at.user = {"is_logged_in": True, "email": email, "name": "Someone"}
    at.run()
    assert not at.exception
    if expected is None:
        assert "has no console role" in at.error[0].value
        return
    assert f"{expected}-badge" in " ".join(m.value for m in at.sidebar.markdown) or (
        f"[{expected}]" in " ".join(m.value for m in at.sidebar.markdown)
    )
    assert ("Bulk operations" in nav_titles(at)) is (expected == "ops")


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
