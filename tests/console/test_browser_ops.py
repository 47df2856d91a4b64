"""Support's day in real Chromium on PostgreSQL: a shared triage link opened in a new tab (the
sign-in carried over by its session cookie) shows the same rows, the whole filtered set
exports as CSV, the list pages through it, sign-out ends every tab, and the dark theme and the
reader's time zone follow the browser. Screenshots go to tests/console/screenshots/.

Locally a missing Chromium or PostgreSQL skips this test; under CI (CI=true) it fails.
"""

from __future__ import annotations

import csv
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from core.crypto import Keyring
from core.db import make_session_factory, session_scope
from core.demo import seed
from core.failed_filter import FailedFilter
from core.models import Delivery
from core.operators import Role, secrets_entry
from core.policy import utcnow
from core.queries import failed
from tests.conftest import service_missing, truncate_all
from tests.console.conftest import KEY_ENTRY
from tests.console.test_browser import (
    CHROMIUM,
    TIMEOUT_MS,
    browser,  # noqa: F401  (the fixture)
    eventually,
    free_port,
    grid_text,
    process_env,
    shot,
    sign_in_page,
    start_console,
    stop,
    wait_healthy,
)

pytestmark = pytest.mark.browser

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
LINK = "triage?error_class=permanent&error_class=transient&provider=resend"
SHARED = FailedFilter(error_classes=("permanent", "transient"), provider="resend")


@pytest.fixture
def pg_stack(tmp_path: Path, pg_database: str, password_hash: str) -> Iterator[dict[str, Any]]:
    """The console on a free port over a PostgreSQL database seeded with demo data."""
    if not Path(CHROMIUM).exists():
        service_missing("Chromium", FileNotFoundError(CHROMIUM))
    engine = create_engine(pg_database)
    truncate_all(engine)
    with session_scope(make_session_factory(engine)) as s:
        seed(s, Keyring.parse(KEY_ENTRY), utcnow(), count=3000)
        s.commit()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(
        "\n".join(
            secrets_entry(name, role, password_hash)
            for name, role in (("vera", Role.VIEWER), ("sam", Role.SUPPORT))
        )
    )
    env = process_env(tmp_path, pg_database)
    port = free_port()
    log = (tmp_path / "console.log").open("wb")
    console = start_console(port, secrets, env, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", console, tmp_path / "console.log")
        yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "tmp": tmp_path}
    finally:
        stop(console)
        log.close()
        engine.dispose()


def expected_ids(engine: Any, flt: FailedFilter) -> list[str]:
    with session_scope(make_session_factory(engine)) as s:
        return [
            str(i)
            for chunk in failed.failed_chunks(s, flt, now=utcnow(), chunk=500)
            for i in chunk["id"]
        ]


def visible_ids(page: Any) -> list[str]:
    found = [UUID.search(t) for t in grid_text(page)]
    return [m.group(0) for m in found if m]


def starts_with(seen: list[str], expected: list[str]) -> bool:
    return len(seen) >= 5 and seen == expected[: len(seen)]


def test_shared_link_export_and_pages_on_postgresql(pg_stack: dict[str, Any], browser: Any) -> None:  # noqa: F811
    from playwright.sync_api import expect

    url, engine = pg_stack["url"], pg_stack["engine"]
    expected = expected_ids(engine, SHARED)
    assert len(expected) > 50, "the seeded data must fill more than two pages"

    # ---- sam signs in; the browser now holds the session cookie
    context = browser.new_context(viewport={"width": 1600, "height": 1400}, accept_downloads=True)
    first = context.new_page()
    sign_in_page(first, url, "sam")
    eventually(
        lambda: any(c["name"] == "capsule_session" for c in context.cookies()),
        "the session cookie is set",
    )

    # ---- a colleague's link, opened in a new tab: no sign-in asked, the same rows
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(f"{url}/{LINK}")
    tab.get_by_role("heading", name="Triage", exact=True).wait_for()
    metric = tab.locator('[data-testid="stMetricValue"]').first
    expect(metric).to_have_text(f"{len(expected):,}")
    eventually(lambda: starts_with(visible_ids(tab), expected), "the link's rows show, in order")
    shot(tab, "20-shared-link-pg")

    # ---- the whole filtered set as CSV, not the rows on screen
    with tab.expect_download() as download:
        tab.get_by_role("button", name=f"Export all {len(expected):,} as CSV").click()
    path = download.value.path()
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][0] == "id" and len(rows) == len(expected) + 1
    assert [r[0] for r in rows[1:]] == expected

    # ---- pages through it, 25 at a time, and back
    tab.locator('[data-testid="stSelectbox"]').filter(has_text="Rows per page").click()
    tab.get_by_role("option", name="25", exact=True).click()
    expect(tab.get_by_text(f"Rows 1–25 of {len(expected):,}", exact=False)).to_be_visible()
    tab.get_by_role("button", name="Older").click()
    expect(tab.get_by_text(f"Rows 26–50 of {len(expected):,}", exact=False)).to_be_visible()
    eventually(lambda: starts_with(visible_ids(tab), expected[25:]), "page 2 shows rows 26–")
    tab.get_by_role("button", name="Older").click()
    expect(tab.get_by_text("Rows 51–", exact=False)).to_be_visible()
    eventually(lambda: starts_with(visible_ids(tab), expected[50:]), "page 3 shows rows 51–")
    shot(tab, "21-triage-page-3-pg")
    tab.get_by_role("button", name="Newer").click()
    expect(tab.get_by_text(f"Rows 26–50 of {len(expected):,}", exact=False)).to_be_visible()
    assert "error_class=permanent" in tab.url and "provider=resend" in tab.url

    # ---- an id is a link to its detail page
    first_link = tab.locator('[data-testid="stDataFrame"] a').first
    href = first_link.get_attribute("href") if first_link.count() else None
    if href is not None:  # glide draws links on canvas; when an anchor exists, check it
        assert "delivery?id=" in href

    # ---- support sends a failed letter to the address its owner gave; the page opens it
    target = expected[-1]
    detail = context.new_page()
    detail.set_default_timeout(TIMEOUT_MS)
    detail.goto(f"{url}/delivery?id={target}")
    expect(detail.get_by_role("heading", name=f"Delivery {target}")).to_be_visible()
    detail.get_by_text("Send to a corrected address").click()
    detail.get_by_label("Corrected address").fill("fixed@example.com")
    detail.get_by_label(re.compile(r"^Reason \(required")).fill(
        "owner's new address (browser test)"
    )
    detail.get_by_role("button", name="Send to this address").click()
    expect(detail.get_by_text(re.compile(r"Redirected: delivery "))).to_be_visible()
    with session_scope(make_session_factory(engine)) as s:
        new = s.scalars(
            select(Delivery).where(Delivery.recipient_email == "fixed@example.com")
        ).one()
        old_status = s.scalar(select(Delivery.status).where(Delivery.id == uuid.UUID(target)))
    assert (old_status, new.status) == ("canceled", "scheduled")
    expect(detail.get_by_role("heading", name=f"Delivery {new.id}")).to_be_visible()
    shot(detail, "22-redirected-pg")
    detail.close()

    # ---- sign out in the first tab: every tab is out, the cookie opens nothing
    first.get_by_role("button", name="Sign out").click()
    first.get_by_label("Username").wait_for()
    tab.get_by_role("button", name="Older").click()
    tab.get_by_label("Username").wait_for()
    fresh = context.new_page()
    fresh.goto(f"{url}/{LINK}")
    fresh.get_by_label("Username").wait_for(timeout=TIMEOUT_MS)
    context.close()


def test_dark_theme_and_local_time_follow_the_browser(
    pg_stack: dict[str, Any],
    browser: Any,  # noqa: F811
) -> None:
    from playwright.sync_api import expect

    url = pg_stack["url"]
    backgrounds = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(
            viewport={"width": 1440, "height": 1200},
            color_scheme=scheme,
            timezone_id="Europe/Lisbon",
        )
        page = context.new_page()
        sign_in_page(page, url, "vera")
        eventually(lambda p=page: p.locator(".js-plotly-plot").count() >= 4, "charts drawn")
        backgrounds[scheme] = page.evaluate(
            "getComputedStyle(document.querySelector('.stApp')).backgroundColor"
        )
        shot(page, f"22-overview-{scheme}")
        toggle = page.get_by_text("Times in my zone (Europe/Lisbon)")
        expect(toggle).to_be_visible()
        if scheme == "dark":
            toggle.click()
            page.get_by_role("link", name="System health").click()
            expect(page.get_by_text(re.compile(r"^Checked .* WE(S)?T$"))).to_be_visible()
            shot(page, "23-health-dark-local-time")
        context.close()
    assert backgrounds["light"] == "rgb(255, 255, 255)"
    assert backgrounds["dark"] == "rgb(15, 20, 25)"
