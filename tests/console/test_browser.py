"""The console end to end in real Chromium: `streamlit run console/app.py` and a real Huey
consumer against a seeded SQLite database. Screenshots of every page go to
tests/console/screenshots/ (gitignored).

Locally a missing Chromium skips this test; under CI (CI=true) it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
from sqlalchemy import create_engine, select

from core.db import make_session_factory, session_scope
from core.failed_filter import FailedFilter, failed_count
from core.models import AuditEvent, BulkOperation, Delivery
from core.operators import Role, secrets_entry
from tests.conftest import service_missing
from tests.console.conftest import KEY_ENTRY, PASSWORD, ROOT

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = Path(__file__).parent / "screenshots"
BIN = Path(sys.executable).parent
TIMEOUT_MS = 30_000
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 60
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url}: {log.read_text()[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def process_env(var_dir: Path, database_url: str) -> dict[str, str]:
    """The environment of the console (and its consumer) under test: this database and key,
    no Redis, no demo mode."""
    env = {
        **os.environ,
        "CAPSULE_VAR_DIR": str(var_dir),
        "CAPSULE_DATABASE_URL": database_url,
        "CAPSULE_ENCRYPTION_KEYS": KEY_ENTRY,
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("CAPSULE_REDIS_URL", "CAPSULE_DEMO_MODE"):
        env.pop(name, None)
    return env


def start_console(
    port: int, secrets: Path, env: dict[str, str], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """`streamlit run console/app.py`, headless on 127.0.0.1:`port`, with these operators."""
    return subprocess.Popen(
        [
            str(BIN / "streamlit"),
            "run",
            "console/app.py",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--server.headless",
            "true",
            "--secrets.files",
            str(secrets),
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def stack(tmp_path: Path, seeded_template: Path, password_hash: str) -> Iterator[dict[str, Any]]:
    """A console on a free port and a consumer, both on a copy of the seeded database."""
    if not Path(CHROMIUM).exists():
        service_missing("Chromium", FileNotFoundError(CHROMIUM))
    db = tmp_path / "capsule.db"
    shutil.copy(seeded_template, db)
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(
        "\n".join(
            secrets_entry(name, role, password_hash)
            for name, role in (("vera", Role.VIEWER), ("sam", Role.SUPPORT), ("olga", Role.OPS))
        )
    )
    env = process_env(tmp_path, f"sqlite:///{db}")
    subprocess.run(  # makes the embedded queue's tables, like `make run`
        [str(BIN / "capsule"), "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True
    )
    port = free_port()
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("console", "consumer")}
    consumer = subprocess.Popen(
        [
            str(BIN / "huey_consumer"),
            "huey_app.huey",
            "-w",
            "2",
            "-k",
            "thread",
            "-d",
            "0.1",
            "-m",
            "0.5",
        ],
        env=env,
        cwd=ROOT,
        stdout=logs["consumer"],
        stderr=subprocess.STDOUT,
    )
    console = start_console(port, secrets, env, logs["console"])
    try:
        wait_healthy(f"http://127.0.0.1:{port}/_stcore/health", console, tmp_path / "console.log")
        yield {"url": f"http://127.0.0.1:{port}", "db": f"sqlite:///{db}", "tmp": tmp_path}
    finally:
        stop(console)
        stop(consumer)
        for handle in logs.values():
            handle.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    # Every expect() waits as long as a locator does: Playwright's own 5 s default is shorter
    # than a Streamlit rerun takes on a machine whose cores are busy with other work
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def settled(page: Any) -> None:
    """Until Streamlit has finished running the page's script (its own run-state marker)."""
    page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').wait_for()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(exist_ok=True)
    settled(page)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in_page(page: Any, url: str, username: str) -> None:
    """Open the console in `page` and sign in as `username`, up to the Overview."""
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("heading", name="Overview").wait_for()


def sign_in(browser: Any, url: str, username: str) -> Any:
    page = browser.new_page(viewport={"width": 1440, "height": 1800})
    sign_in_page(page, url, username)
    return page


def go(page: Any, title: str) -> None:
    page.get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()
    settled(page)


def grid_text(page: Any, nth: int = 0) -> list[str]:
    """The visible cells of a st.dataframe (its accessible grid)."""
    grid = page.locator('[data-testid="stDataFrame"]').nth(nth)
    grid.scroll_into_view_if_needed()
    cells = grid.locator('[role="gridcell"]')
    return [cells.nth(i).inner_text(timeout=2000) for i in range(cells.count())]


def eventually(read: Callable[[], T], what: str, seconds: float = 20) -> T:
    """The first truthy `read()`, retried while the page re-renders (grids are redrawn)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = read()
            if value:
                return value
        except Exception:  # an element replaced mid-read: read again
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.3)


def select_first_row(page: Any) -> None:
    """Select the first row of the canvas-drawn grid with its keyboard, not a pixel offset:
    an arrow key puts the cursor in the grid, ArrowUp moves it up until the first row (it
    stops there), Shift+Space selects that row."""
    settled(page)
    grid = page.locator('[data-testid="stDataFrame"]').first
    grid.locator('[data-testid="data-grid-canvas"]').focus()
    for key in ("ArrowDown", "ArrowUp", "ArrowUp", "ArrowUp", "Shift+Space"):
        page.keyboard.press(key)


def test_console_end_to_end(stack: dict[str, Any], browser: Any) -> None:
    from playwright.sync_api import expect

    url = stack["url"]
    factory = make_session_factory(create_engine(stack["db"]))
    with session_scope(factory) as s:
        failed_before = failed_count(s, FailedFilter())

    # ---- the sign-in page
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(url)
    page.get_by_label("Username").wait_for(timeout=TIMEOUT_MS)
    shot(page, "01-sign-in")
    page.close()

    # ---- support: requeue a failed delivery with a reason
    page = sign_in(browser, url, "sam")
    expect(page.get_by_text("Stuck", exact=True)).to_be_visible()
    eventually(lambda: page.locator(".js-plotly-plot .main-svg").count() >= 4, "charts drawn")
    shot(page, "02-overview")
    go(page, "System health")
    expect(page.get_by_text("Recent safety-net runs")).to_be_visible()
    shot(page, "03-system-health")

    go(page, "Triage")
    first_row = eventually(lambda: grid_text(page)[:2], "the failed list shows")
    select_first_row(page)
    expect(page.get_by_text("1 selected")).to_be_visible()
    shot(page, "04-triage-selected")
    page.get_by_role("button", name="Requeue").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_text("send again now")).to_be_visible()
    dialog.get_by_role("textbox").fill("Resend outage is over (browser test)")
    shot(page, "05-triage-dialog")
    dialog.get_by_role("button", name="Requeue 1").click()
    expect(page.get_by_text(re.compile(r"Requeue: 1 delivery"))).to_be_visible()
    expect(page.get_by_text(f"{failed_before - 1:,}", exact=True)).to_be_visible()
    eventually(lambda: grid_text(page)[:2] not in ([], first_row), "it left the failed list")
    shot(page, "06-triage-after-requeue")

    with session_scope(factory) as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.actor == "sam")).one()
        requeued = str(event.delivery_id)
        assert s.scalar(select(Delivery.status).where(Delivery.id == event.delivery_id)) in {
            "scheduled",
            "processing",
            "sent",
        }
    assert (event.type, event.reason) == (
        "delivery.requeued",
        "Resend outage is over (browser test)",
    )

    go(page, "Delivery detail")
    page.get_by_label("Delivery id, or a recipient's or owner's email").fill(requeued)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=f"Delivery {requeued}")).to_be_visible()
    expect(page.get_by_role("heading", name="Audit trail")).to_be_visible()
    shot(page, "07-delivery-detail")
    eventually(
        lambda: any(
            "delivery.requeued" in " ".join(grid_text(page, i))
            and "sam" in " ".join(grid_text(page, i))
            for i in range(page.locator('[data-testid="stDataFrame"]').count())
        ),
        "the detail's audit trail shows the requeue by sam",
    )

    go(page, "Audit log")
    page.get_by_label("Actor").fill("sam")
    page.keyboard.press("Enter")
    expect(page.get_by_text("Events 1–1, newest first")).to_be_visible()
    eventually(
        lambda: (
            "delivery.requeued" in " ".join(grid_text(page))
            and "Resend outage is over (browser test)" in " ".join(grid_text(page))
        ),
        "the audit log shows the requeue and its reason",
    )
    shot(page, "08-audit-log")
    page.close()

    # ---- viewer: the same pages without a single action button
    page = sign_in(browser, url, "vera")
    assert page.get_by_role("link", name="Bulk operations").count() == 0
    go(page, "Triage")
    expect(page.get_by_text("You have read-only access.")).to_be_visible()
    for label in ("Requeue", "Cancel", "Notify owner"):
        assert page.get_by_role("button", name=label).count() == 0
    shot(page, "09-viewer-triage")
    page.close()

    # ---- ops: a bulk requeue of the transient failures, run by the consumer
    page = sign_in(browser, url, "olga")
    go(page, "Bulk operations")
    page.locator('[data-testid="stMultiSelect"]').filter(has_text="Error class").click()
    page.get_by_role("option", name="transient", exact=True).click()
    page.keyboard.press("Escape")
    with session_scope(factory) as s:
        expected = failed_count(s, FailedFilter(error_classes=("transient",)))
    assert expected > 0
    metric = page.locator('[data-testid="stMetricValue"]').first
    expect(metric).to_have_text(f"{expected:,}")
    rate = page.get_by_label("Rate (deliveries per second)")
    rate.fill("50")
    rate.press("Enter")
    settled(page)
    page.get_by_role("button", name="Dry run").click()
    expect(page.get_by_text("Dry run: nothing was changed", exact=False)).to_be_visible()
    page.get_by_label(re.compile(r"^Reason \(required; recorded on every")).fill(
        "Postmark quota reset (browser test)"
    )
    page.get_by_label(f"Type {expected} to confirm").fill(str(expected))
    shot(page, "10-bulk-dry-run")
    page.get_by_role("button", name=re.compile(rf"^Requeue {expected:,} deliveries")).click()
    # "started" stays until the page sees the operation end (its poll, every 2 s); a busy
    # browser may not look in that window, and the consumer may finish first: either will do.
    started = page.get_by_text(re.compile(r"Bulk operation #1 started: "))
    done = page.get_by_text(re.compile(r"Bulk operation #1 done: \d+ requeued"))
    expect(started.or_(done).first).to_be_visible()
    expect(done).to_be_visible(timeout=90_000)
    shot(page, "11-bulk-done")
    page.close()

    with session_scope(factory) as s:
        op = s.scalars(select(BulkOperation)).one()
        assert (op.state, op.actor, op.expected_count) == ("done", "olga", expected)
        assert op.done_count + op.skipped_count == expected
        bulk_events = s.scalars(
            select(AuditEvent).where(AuditEvent.type == "delivery.bulk_requeued")
        ).all()
    assert len(bulk_events) == op.done_count
    assert {e.actor for e in bulk_events} == {"olga"}
    assert all(uuid.UUID(str(e.delivery_id)) for e in bulk_events)
