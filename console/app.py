"""The console's entry point: `streamlit run console/app.py`. It only signs in and navigates."""

from __future__ import annotations

import streamlit as st

from console import auth, data, ui
from core import logs, telemetry
from core.errors import ConfigError
from core.operators import Role

st.set_page_config(
    page_title="Capsule console",
    page_icon=":material/mark_email_read:",
    layout="wide",
    initial_sidebar_state="expanded",
)

try:
    logs.configure_logging(data.settings(), default_level="WARNING")  # a no-op once done
    telemetry.init_sentry(data.settings(), component="console")  # once per process; then a no-op
    data.get_app()
except ConfigError as exc:  # e.g. demo mode with a real provider: refuse, in one clear line
    st.error(f"The console cannot start: {ui.text(exc)}", icon=":material/error:")
    st.stop()

operator = auth.current_operator()
auth.cookie_script()
if operator is None:
    st.navigation([st.Page(auth.login_page, title="Sign in", icon=":material/login:")]).run()
else:
    auth.sidebar(operator)
    with st.sidebar:
        ui.time_toggle()
    auth.demo_banner(operator)
    pages = {
        "Monitor": [
            st.Page(
                "views/overview.py", title="Overview", icon=":material/monitoring:", default=True
            ),
            st.Page("views/health.py", title="System health", icon=":material/health_and_safety:"),
        ],
        "Support": [
            st.Page("views/triage.py", title="Triage", icon=":material/medical_services:"),
            st.Page("views/delivery.py", title="Delivery detail", icon=":material/search:"),
        ],
        "Records": [st.Page("views/audit.py", title="Audit log", icon=":material/history:")],
    }
    if operator.can(Role.OPS):
        pages["Ops"] = [
            st.Page("views/bulk.py", title="Bulk operations", icon=":material/dynamic_feed:")
        ]
    st.navigation(pages).run()
