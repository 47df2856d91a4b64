"""Who is using the console, and with which role.

Three modes, chosen by configuration:

- **OIDC** when secrets have an `[auth]` section: `st.login()`; the role comes from the
  `[roles]` table (email → viewer | support | ops). A signed-in email not listed gets nothing.
- **Local accounts** otherwise: `[operators.<username>]` tables with `password_hash` (salted
  scrypt, made by `capsule operator add`) and `role`.
- **Demo mode** when CAPSULE_DEMO_MODE is on (allowed only on the embedded default): everyone
  is the demo ops user, and every page says so.

The role decides what the pages show; `core.triage` and `core.bulk` enforce it again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import streamlit as st

from console import data
from core.operators import DEMO_OPERATOR, Operator, authenticate, operator_for_email

OPERATOR_KEY = "_operator"
FAILURES_KEY = "_login_failures"
MAX_FAILURES = 5
LOCKOUT_SECONDS = 30


def _secret(name: str) -> Mapping[str, Any] | None:
    try:
        if name in st.secrets:
            section = st.secrets[name]
            return section if isinstance(section, Mapping) else None
    except Exception:  # no secrets file at all: no section either
        return None
    return None


def mode() -> str:
    """demo | oidc | local"""
    if data.settings().demo_mode:
        return "demo"
    return "oidc" if _secret("auth") is not None else "local"


def _oidc_providers() -> list[str]:
    section = _secret("auth") or {}
    return [name for name, value in section.items() if isinstance(value, Mapping)]


def _oidc_signed_in() -> bool:
    return bool(st.user.get("is_logged_in", False))


def current_operator() -> Operator | None:
    """The signed-in operator, or None (not signed in, or signed in without a role)."""
    kind = mode()
    if kind == "demo":
        return DEMO_OPERATOR
    if kind == "oidc":
        if not _oidc_signed_in():
            return None
        email, name = st.user.get("email"), st.user.get("name")
        return operator_for_email(_secret("roles") or {}, str(email or ""), str(name or ""))
    found = st.session_state.get(OPERATOR_KEY)
    return found if isinstance(found, Operator) else None


def require_operator() -> Operator:
    """For pages: the operator, or stop here (the entry page shows the sign-in form)."""
    operator = current_operator()
    if operator is None:
        st.warning("Please sign in.")
        st.stop()
    assert operator is not None
    return operator


def sign_out() -> None:
    if mode() == "oidc":
        st.logout()
        return
    st.session_state.pop(OPERATOR_KEY, None)
    st.cache_data.clear()
    st.rerun()


def _locked_for() -> float:
    failures: list[float] = st.session_state.get(FAILURES_KEY, [])
    recent = [t for t in failures if time.monotonic() - t < LOCKOUT_SECONDS]
    st.session_state[FAILURES_KEY] = recent
    if len(recent) < MAX_FAILURES:
        return 0.0
    return LOCKOUT_SECONDS - (time.monotonic() - recent[0])


def login_page() -> None:
    """The only page before signing in."""
    _, middle, _ = st.columns([1, 2, 1])
    with middle:
        st.title(":material/mark_email_read: Capsule console")
        st.caption("Operations console for scheduled letter deliveries.")
        if mode() == "oidc":
            _oidc_login()
        else:
            _local_login()


def _oidc_login() -> None:
    if _oidc_signed_in():
        st.error(
            f"{st.user.get('email') or 'This account'} has no console role. Ask an admin to "
            "add it to the `[roles]` table of the console's secrets."
        )
        if st.button("Sign out", icon=":material/logout:"):
            st.logout()
        return
    providers = _oidc_providers()
    if not providers:
        if st.button("Sign in with your company account", type="primary", key="oidc_login"):
            st.login()
        return
    for provider in providers:
        if st.button(f"Sign in with {provider}", type="primary", key=f"oidc_login_{provider}"):
            st.login(provider)


def _local_login() -> None:
    accounts = _secret("operators")
    if not accounts:
        st.info(
            "No operator accounts are configured. Create one with\n\n"
            "`capsule operator add NAME --role ops --secrets .streamlit/secrets.toml`\n\n"
            "then reload this page."
        )
        return
    locked = _locked_for()
    with st.form("login", border=True):
        username = st.text_input("Username", key="login_username")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button(
            "Sign in", type="primary", icon=":material/login:", width="stretch"
        )
    if not submitted:
        return
    if locked > 0:
        st.error(f"Too many failed attempts. Try again in {locked:.0f} seconds.")
        return
    operator = authenticate(accounts, username, password)
    if operator is None:
        st.session_state.setdefault(FAILURES_KEY, []).append(time.monotonic())
        st.error("Unknown username or wrong password.")
        return
    st.session_state.pop(FAILURES_KEY, None)
    st.session_state[OPERATOR_KEY] = operator
    st.rerun()


ROLE_BADGES = {
    "viewer": ":gray-badge[viewer]",
    "support": ":blue-badge[support]",
    "ops": ":orange-badge[ops]",
}


def sidebar(operator: Operator) -> None:
    with st.sidebar:
        st.markdown(f"**{operator.label}**  \n{ROLE_BADGES[operator.role.value]}")
        if operator.source != "demo" and st.button(
            "Sign out", icon=":material/logout:", key="sign_out"
        ):
            sign_out()


def demo_banner(operator: Operator) -> None:
    if operator.source == "demo":
        st.warning(
            "**Demo mode**: no sign-in; everyone acts as the demo ops user. "
            "Only for the embedded demo database.",
            icon=":material/science:",
        )
