"""Console render: every console page in a real Chromium at 1,000,000 deliveries on PostgreSQL.

The data is the scale benchmark's (benchmarks.scale.generate: the same working set and
proportions, VACUUM ANALYZE; then the hourly rollup, as a live system has it). The console runs
as in production (`streamlit run console/app.py`, PostgreSQL, Redis) with an ops operator; a
headless Chromium signs in and opens each page from the sidebar, timing the click to the page's
first full render: its heading and main element shown, no spinner, no skeleton, no stale
element left from the page before, and the script no longer running. Each page is opened
twice: cold (the page's cached loaders empty) and warm (within their cache time).

    .venv/bin/python -m benchmarks.console_render                  # 1,000,000 deliveries
    .venv/bin/python -m benchmarks.console_render --size 10000 --keep
    .venv/bin/python -m benchmarks.console_render --database capsule_bench_1234abcd  # reuse
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from benchmarks.common import (
    PG_ADMIN_URL,
    REDIS_BASE,
    REDIS_DB,
    RESULTS,
    ROOT,
    Bench,
    System,
    base_parser,
    load,
    log,
    machine,
    table,
    write_results,
)
from benchmarks.scale import generate
from core import rollup
from core.crypto import generate_key_entry
from core.db import make_session_factory, session_scope
from core.models import Delivery
from core.operators import Role, hash_password, secrets_entry
from core.policy import utcnow

TARGET_SECONDS = 2.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
USERNAME, PASSWORD = "olga", "render benchmark password"
TIMEOUT_MS = 120_000

# page title → what its first full render shows: CSS selector → at least this many; texts
PAGES: list[tuple[str, dict[str, int], list[str]]] = [
    ("Overview", {'[data-testid="stMetricValue"]': 1, ".js-plotly-plot": 1}, ["Stuck deliveries"]),
    ("System health", {'[data-testid="stDataFrame"]': 1}, ["Recent safety-net runs"]),
    ("Triage", {'[data-testid="stDataFrame"]': 1, '[data-testid="stMetricValue"]': 1}, []),
    ("Delivery detail", {'[data-testid="stTextInput"]': 1}, []),
    ("Audit log", {'[data-testid="stDataFrame"]': 1}, []),
    ("Bulk operations", {'[data-testid="stMetricValue"]': 1}, ["History"]),
]

RENDERED = """
({title, selectors, texts}) => {
  const headings = [...document.querySelectorAll('h1, h2, h3')];
  if (!headings.some(h => h.innerText.trim() === title)) return false;
  for (const [css, least] of Object.entries(selectors)) {
    if (document.querySelectorAll(css).length < least) return false;
  }
  const body = document.body.innerText;
  if (!texts.every(t => body.includes(t))) return false;
  if (document.querySelector('[data-testid="stSpinner"], [data-testid="stSkeleton"]')) return false;
  if (document.querySelector('[data-stale="true"]')) return false;
  if (document.querySelector('[data-testid="stStatusWidgetRunningIcon"]')) return false;
  if (document.querySelector('[data-testid="stStatusWidgetRunningManIcon"]')) return false;
  return true;
}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer at {url}")


def _console(system: System) -> tuple[subprocess.Popen[bytes], str]:
    secrets = system.var_dir / "secrets.toml"
    secrets.write_text(secrets_entry(USERNAME, Role.OPS, hash_password(PASSWORD)))
    port = _free_port()
    log_path = system.var_dir / "console.log"
    handle = log_path.open("wb")
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "streamlit"),
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
        env=system.env,
        cwd=ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    handle.close()
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(f"{url}/_stcore/health", process, log_path)
    return process, url


def _rendered(page: Any, title: str, selectors: dict[str, int], texts: list[str]) -> None:
    page.wait_for_function(
        RENDERED,
        arg={"title": title, "selectors": selectors, "texts": texts},
        polling="raf",
        timeout=TIMEOUT_MS,
    )


VISITS = {1: "cold", 2: "warm", 3: "new tab"}


def _sign_in(browser: Any, url: str, visit: int, timings: list[dict[str, Any]]) -> Any:
    page = browser.new_context(viewport={"width": 1440, "height": 1800}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.get_by_label("Username").fill(USERNAME)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    t0 = time.perf_counter()
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("link", name="Triage").wait_for()  # signed in: the navigation shows
    timings.append(
        {"page": "Sign-in (navigation shown)", "visit": visit, "s": time.perf_counter() - t0}
    )
    title, selectors, texts = PAGES[0]
    _rendered(page, title, selectors, texts)
    timings.append(
        {"page": "Overview (from sign-in)", "visit": visit, "s": time.perf_counter() - t0}
    )
    return page


def _visit_all(page: Any, delivery_id: str, visit: int, timings: list[dict[str, Any]]) -> None:
    for title, selectors, texts in PAGES:
        if title == "Overview" and visit != 2:
            continue  # timed from the sign-in
        t0 = time.perf_counter()
        page.get_by_role("link", name=title).click()
        _rendered(page, title, selectors, texts)
        timings.append({"page": title, "visit": visit, "s": time.perf_counter() - t0})
        if title == "Delivery detail":
            field = page.get_by_label("Delivery id, or a recipient's or owner's email")
            field.fill(delivery_id)
            t0 = time.perf_counter()
            field.press("Enter")
            _rendered(
                page, f"Delivery {delivery_id}", {'[data-testid="stDataFrame"]': 1}, ["Audit trail"]
            )
            elapsed = time.perf_counter() - t0
            timings.append({"page": "Delivery detail (one id)", "visit": visit, "s": elapsed})


def _browse(url: str, delivery_id: str, passes: int) -> list[dict[str, Any]]:
    """Visit 1 (cold: the server's caches empty, the browser fresh), 2 (warm: the same tab
    again, within the caches' time), 3 (new tab: a fresh browser context signing in again,
    so the server is warm and the browser cold: what a browser's first render costs alone)."""
    from playwright.sync_api import sync_playwright

    timings: list[dict[str, Any]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = _sign_in(browser, url, 1, timings)
        _visit_all(page, delivery_id, 1, timings)
        if passes >= 2:
            _visit_all(page, delivery_id, 2, timings)
        if passes >= 3:
            _visit_all(_sign_in(browser, url, 3, timings), delivery_id, 3, timings)
        browser.close()
    return timings


def _facts(database_url: str) -> tuple[int, str]:
    """How many deliveries there are, and one failed delivery's id (for the detail page)."""
    engine = create_engine(database_url)
    with session_scope(make_session_factory(engine)) as session:
        count = int(session.scalar(select(func.count()).select_from(Delivery)) or 0)
        failed = session.scalar(
            select(Delivery.id).where(Delivery.status == "failed").order_by(Delivery.id).limit(1)
        )
    engine.dispose()
    return count, str(failed)


def _reused(database: str) -> System:
    """The deployment of a database generated by an earlier `--keep` run."""
    url = make_url(PG_ADMIN_URL).set(database=database).render_as_string(False)
    var_dir = RESULTS / "runs" / f"console-render-{database[-8:]}"
    var_dir.mkdir(parents=True, exist_ok=True)
    return System(
        var_dir=var_dir,
        database_url=str(url),
        key_entry=generate_key_entry("bench1"),
        redis_url=f"{REDIS_BASE}/{REDIS_DB}",
        huey_name=database,
    )


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="deliveries to generate")
    parser.add_argument(
        "--passes", type=int, default=3, help="1 cold, 2 + warm (same tab), 3 + a new tab"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database (reuse it later)")
    parser.add_argument("--generate-only", action="store_true", help="generate, keep, stop")
    parser.add_argument("--database", help="reuse this kept benchmark database; generate nothing")
    args = parser.parse_args(argv)

    info = machine()
    log(f"machine: {info}")
    bench: Bench | None = None
    generated = None
    if args.database:
        system, database = _reused(args.database), args.database
    else:
        bench = Bench("console-render", keep_database=args.keep or args.generate_only)
        system, database = bench.system, bench.database
        now = utcnow()
        log(f"generating {args.size:,} deliveries in {database} (load {load()})")
        generated = generate(bench, args.size, now)
        rollup.run(bench.app.session_factory, now=now)  # as the hourly task has, live
        log(f"generated in {generated:.0f} s (load {load()})")
    try:
        if args.generate_only:
            log(f"kept database {database}: measure with --database {database}")
            return 0
        size, delivery_id = _facts(system.database_url)
        console, url = _console(system)
        try:
            before = load()
            log(f"browsing {url} at {size:,} deliveries (load {before})")
            timings = _browse(url, delivery_id, args.passes)
            after = load()
        finally:
            console.terminate()
            console.wait(15)
    finally:
        if bench is not None:
            bench.close()
    by_page: dict[str, dict[int, float]] = {}
    for t in timings:
        by_page.setdefault(t["page"], {})[t["visit"]] = t["s"]
    visits = sorted({t["visit"] for t in timings})

    def cell(seconds: float | None) -> str:
        if seconds is None:
            return ""
        return f"{seconds:.2f}" + ("" if seconds <= TARGET_SECONDS else " (missed)")

    table(
        ["page", *(f"{VISITS[v]} s" for v in visits)],
        [[page, *(cell(times.get(v)) for v in visits)] for page, times in by_page.items()],
        title=f"Console first full render at {size:,} deliveries, target ≤ {TARGET_SECONDS:g} s "
        f"(load {before} → {after})",
    )
    write_results(
        "console_render",
        {
            "machine": info,
            "args": vars(args),
            "database": database,
            "deliveries": size,
            "generate_seconds": generated,
            "load_before": before,
            "load_after": after,
            "timings": timings,
        },
    )
    if args.keep or args.database:
        log(f"kept database {database}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
