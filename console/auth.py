"""Who is using the console, and with which role.

Three modes, chosen by configuration:

- **OIDC** when secrets have an `[auth]` section: `st.login()`; the role comes from the
  `[roles]` table (email → viewer | support | ops). A signed-in email not listed gets nothing.
- **Local accounts** otherwise: `[operators.<username>]` tables with `password_hash` (Argon2id,
  made by `capsule operator add`) and `role`. Failed sign-ins are counted in the database, per
  account and per client address (`core.operators.sign_in`), so a new browser session does not
  reset a lockout.
- **Demo mode** when CAPSULE_DEMO_MODE is on (allowed only on the embedded default): everyone
  is the demo ops user, and every page says so.

A local sign-in also starts a server-side session (`core.sessions`, table
`console_sessions`): the browser keeps its signed, expiring token in a cookie, so a new tab
resumes it. Streamlit has no server API to set a cookie, so a small script (st.html with
JavaScript, never iframed) sets it in the page; `st.context.cookies` reads it back when a tab
connects. The token is checked against the database on every page run, and signing out
revokes it for every tab. A `[console] session_secret` in the secrets signs tokens; without one
each console process signs with its own random key (a restart signs everyone out).

The operator is looked up again on every page run (the `[operators]` entry, or the `[roles]`
table): a removed or demoted operator, or one whose password was replaced, loses access at the
next click, not at the end of the session. The role decides what the pages show; `core.triage`
and `core.bulk` enforce it again.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import streamlit as st

from console import data, ui
from core import sessions
from core.db import session_scope
from core.operators import (
    DEMO_OPERATOR,
    Operator,
    account_operator,
    hash_fingerprint,
    operator_for_email,
    sign_in,
)
from core.policy import utcnow

OPERATOR_KEY = "_operator"
FINGERPRINT_KEY = "_operator_hash"
TOKEN_KEY = "_session_token"
COOKIE_KEY = "_session_cookie"  # what the page's cookie script does: ("set", token) | ("clear",)
COOKIE = "capsule_session"


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
        return operator_for_email(
            _secret("roles") or {},
            str(email or ""),
            str(name or ""),
            email_verified=_email_verified(st.user.get("email_verified")),
        )
    return _local_operator()


def _email_verified(claim: Any) -> bool:
    # Some identity providers send the claim as the string "true".
    return claim is True or (isinstance(claim, str) and claim.strip().lower() == "true")


def _local_operator() -> Operator | None:
    """The local operator of this tab (or of the browser's session cookie, in a new tab) as
    the `[operators]` table has it now, or None, and the tab forgets it, when the session was
    revoked or expired, the entry is gone, its role is unknown, or its hash changed."""
    found = st.session_state.get(OPERATOR_KEY)
    token = st.session_state.get(TOKEN_KEY)
    if not isinstance(found, Operator):
        token = browser_token()
        if not token:
            return None
    if token:
        resumed = _resume(token)
        if resumed is None or (isinstance(found, Operator) and found.identity != resumed.username):
            _forget()
            return None
        username, signed_with = resumed.username, resumed.fingerprint
        st.session_state[TOKEN_KEY] = token
    else:  # signed in in this tab without a session (no fingerprint to tie one to)
        assert isinstance(found, Operator)
        username, signed_with = found.identity, st.session_state.get(FINGERPRINT_KEY)
    accounts = _secret("operators") or {}
    current = account_operator(accounts, username)
    entry = accounts.get(username)
    replaced = (
        signed_with is not None
        and isinstance(entry, Mapping)
        and hash_fingerprint(str(entry.get("password_hash", ""))) != signed_with
    )
    if replaced or current is None:
        _forget()
        return None
    if current != found:
        st.session_state[OPERATOR_KEY] = current
    st.session_state[FINGERPRINT_KEY] = signed_with
    return current


def _forget() -> None:
    for key in (OPERATOR_KEY, FINGERPRINT_KEY, TOKEN_KEY):
        st.session_state.pop(key, None)


# ---------------------------------------------------------------- sessions that survive a tab


@st.cache_resource(show_spinner=False)
def _process_key() -> bytes:
    return sessions.new_key()


def session_key() -> bytes:
    """The key that signs session tokens: from `[console] session_secret`, else this
    process's own random key."""
    configured = (_secret("console") or {}).get("session_secret")
    if configured:
        return hashlib.sha256(str(configured).encode()).digest()
    return _process_key()


def session_ttl() -> timedelta:
    """How long a sign-in lasts: `[console] session_hours` (default 12)."""
    raw = (_secret("console") or {}).get("session_hours", 12)
    try:
        hours = float(raw)
    except (TypeError, ValueError):
        hours = 0.0
    return timedelta(hours=hours) if 0 < hours <= 24 * 30 else sessions.DEFAULT_TTL


def browser_token() -> str | None:
    """The session token in the cookie the browser sent when this tab connected."""
    try:
        value = st.context.cookies.get(COOKIE)
    except Exception:  # no browser behind this run (tests, bare mode)
        return None
    return str(value) if value else None


def _resume(token: str) -> sessions.Resumed | None:
    with session_scope(data.get_app().session_factory) as s:
        return sessions.resume(s, token, key=session_key(), now=utcnow())


def _start_session(username: str, fingerprint: str) -> None:
    ttl = session_ttl()
    with session_scope(data.get_app().session_factory) as s:
        token = sessions.issue(
            s, username=username, fingerprint=fingerprint, key=session_key(), now=utcnow(), ttl=ttl
        )
        s.commit()
    st.session_state[TOKEN_KEY] = token
    st.session_state[COOKIE_KEY] = ("set", token, int(ttl.total_seconds()))


def cookie_script() -> None:
    """Set or clear the session cookie in the browser (Streamlit cannot from the server). The
    token is ours (base64url and dots), never user input; json.dumps quotes it anyway."""
    action = st.session_state.get(COOKIE_KEY)
    if not action:
        return
    if action[0] == "set":
        value, max_age = action[1], int(action[2])
    else:
        value, max_age = "", 0
    st.html(
        "<script>(() => {"
        'const secure = window.location.protocol === "https:" ? "; Secure" : "";'
        f"document.cookie = {json.dumps(COOKIE + '=')} + {json.dumps(value)}"
        f' + "; Path=/; Max-Age={max_age}; SameSite=Strict" + secure;'
        "})();</script>",
        unsafe_allow_javascript=True,
        width="content",
    )


def require_operator() -> Operator:
    """For pages: the operator, or stop here (the entry page shows the sign-in form)."""
    operator = current_operator()
    if operator is None:
        st.warning("Please sign in.")
        st.stop()
    assert operator is not None
    return operator


def sign_out() -> None:
    """OIDC: st.logout(). Local: revoke the session (every tab holding it is signed out at its
    next click), forget it here, and clear the cookie."""
    if mode() == "oidc":
        st.logout()
        return
    token = st.session_state.get(TOKEN_KEY) or browser_token()
    if token:
        with session_scope(data.get_app().session_factory) as s:
            sessions.revoke(s, token, key=session_key(), now=utcnow())
            s.commit()
    _forget()
    st.session_state[COOKIE_KEY] = ("clear",)
    st.cache_data.clear()
    st.rerun()


def client_address(peer: str | None, forwarded_for: str | None, trusted: Any) -> str | None:
    """The address the sign-in lockout counts: the TCP peer, or, when the peer is one of the
    `trusted` proxies (addresses or networks), the address that proxy put last in
    X-Forwarded-For. Streamlit reports a loopback peer as None."""
    peer_ip = peer or "127.0.0.1"
    if forwarded_for and isinstance(trusted, list | tuple) and _in_networks(peer_ip, trusted):
        last = forwarded_for.split(",")[-1].strip()
        if last:
            try:
                return str(ipaddress.ip_address(last))
            except ValueError:
                return peer
    return peer


def _in_networks(address: str, networks: Any) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for network in networks:
        try:
            if ip in ipaddress.ip_network(str(network), strict=False):
                return True
        except ValueError:
            continue
    return False


def _client_address() -> str | None:
    try:
        peer = st.context.ip_address
        forwarded = st.context.headers.get("X-Forwarded-For")
    except Exception:  # not every runtime exposes them (tests)
        return None
    trusted = (_secret("console") or {}).get("trusted_proxies", [])
    return client_address(str(peer) if peer else None, forwarded, trusted)


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
        email = st.user.get("email")
        who = ui.code(email) if email else "This account"
        if email and not _email_verified(st.user.get("email_verified")):
            st.error(
                f"Your identity provider has not verified {who}, so it gives no console role. "
                "Verify the address with the identity provider, then sign in again."
            )
        else:
            st.error(
                f"{who} has no console role. Ask an admin to add it to the `[roles]` table "
                "of the console's secrets."
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
    with st.form("login", border=True):
        username = st.text_input("Username", key="login_username")
        password = st.text_input("Password", type="password", key="login_password")
        submitted = st.form_submit_button(
            "Sign in", type="primary", icon=":material/login:", width="stretch"
        )
    if not submitted:
        return
    now = utcnow()
    with session_scope(data.get_app().session_factory) as session:
        result = sign_in(session, accounts, username, password, client=_client_address(), now=now)
        session.commit()
    if result.locked_until is not None:
        wait = max(1, int((result.locked_until - now).total_seconds() + 0.999))
        minutes = f"{wait // 60} min {wait % 60} s" if wait >= 60 else f"{wait} s"
        st.error(f"Too many failed sign-ins. Try again in {minutes}.")
        return
    if result.operator is None:
        st.error("Unknown username or wrong password.")
        return
    st.session_state[OPERATOR_KEY] = result.operator
    st.session_state[FINGERPRINT_KEY] = result.fingerprint
    if result.fingerprint:
        _start_session(result.operator.identity, result.fingerprint)
    st.rerun()


ROLE_BADGES = {
    "viewer": ":gray-badge[viewer]",
    "support": ":blue-badge[support]",
    "ops": ":orange-badge[ops]",
}


def sidebar(operator: Operator) -> None:
    with st.sidebar:
        st.markdown(f"**{ui.text(operator.label)}**  \n{ROLE_BADGES[operator.role.value]}")
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
