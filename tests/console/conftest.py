"""Console fixtures: a seeded SQLite database, CAPSULE_* settings pointing at it, fresh
Streamlit caches, fake broker seams, and AppTest runs of console/app.py as a given operator."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import streamlit as st
from sqlalchemy import Engine, create_engine
from streamlit.testing.v1 import AppTest

from core.crypto import Keyring, generate_key_entry
from core.db import make_session_factory, session_scope
from core.demo import seed
from core.errors import ConfigError
from core.migrate import upgrade
from core.operators import Operator, hash_password
from core.policy import utcnow
from tests.conftest import RecordingEnqueuer

ROOT = Path(__file__).resolve().parents[2]
ENTRY = str(ROOT / "console" / "app.py")
PASSWORD = "correct horse battery staple"
KEY_ENTRY = generate_key_entry("console1")


@pytest.fixture(scope="session")
def password_hash() -> str:
    return hash_password(PASSWORD)


@pytest.fixture(scope="session")
def seeded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated database with a few hundred demo deliveries, copied for each test."""
    path = tmp_path_factory.mktemp("console-template") / "capsule.db"
    engine = create_engine(f"sqlite:///{path}")
    upgrade(engine)
    with session_scope(make_session_factory(engine)) as session:
        seed(session, Keyring.parse(KEY_ENTRY), utcnow(), count=400)
        session.commit()
    engine.dispose()
    return path


@dataclass
class Seams:
    """What the console handed to the broker during a test."""

    enqueuer: RecordingEnqueuer = field(default_factory=RecordingEnqueuer)
    bulk_runs: list[int] = field(default_factory=list)


@pytest.fixture
def console_env(
    tmp_path: Path, seeded_template: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Seams]:
    db = tmp_path / "capsule.db"
    shutil.copy(seeded_template, db)
    monkeypatch.setenv("CAPSULE_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("CAPSULE_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("CAPSULE_ENCRYPTION_KEYS", KEY_ENTRY)
    monkeypatch.delenv("CAPSULE_REDIS_URL", raising=False)
    monkeypatch.delenv("CAPSULE_DEMO_MODE", raising=False)

    import console.data

    seams = Seams()

    def enqueue_bulk(operation_id: int) -> str:
        seams.bulk_runs.append(operation_id)
        return f"bulk-task-{operation_id}"

    monkeypatch.setattr(console.data, "make_enqueuer", lambda settings: seams.enqueuer)
    monkeypatch.setattr(console.data, "enqueue_bulk", enqueue_bulk)
    monkeypatch.setattr(
        console.data, "read_queue_depth", lambda: console.data.QueueDepth(pending=3, scheduled=7)
    )
    st.cache_data.clear()
    st.cache_resource.clear()
    yield seams
    with contextlib.suppress(ConfigError):  # a test of settings the console refuses
        console.data.get_app().engine.dispose()
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture
def engine(console_env: Seams) -> Iterator[Engine]:
    """An engine on the console's database (the seeded copy)."""
    engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    yield engine
    engine.dispose()


def accounts(password_hash: str) -> dict[str, Any]:
    return {
        name: {"password_hash": password_hash, "role": role, "name": name.title()}
        for name, role in (("vera", "viewer"), ("sam", "support"), ("olga", "ops"))
    }


Runner = Callable[..., AppTest]


@pytest.fixture
def console(console_env: Seams, password_hash: str) -> Runner:
    """`console(operator, page=...)`: an AppTest of the entry file, signed in, on that page."""

    def run(operator: Operator | None = None, page: str | None = None) -> AppTest:
        at = AppTest.from_file(ENTRY, default_timeout=30)
        at.secrets["operators"] = accounts(password_hash)
        if operator is not None:
            at.session_state["_operator"] = operator
        at.run()
        if page is not None:
            at.switch_page(f"views/{page}.py").run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return run


def markdown_values(at: AppTest) -> list[str]:
    """Every string on the page (main area and sidebar) that Streamlit renders as Markdown."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption]
    for kind in (at.success, at.info, at.warning, at.error, at.toast):
        parts += [e.value for e in kind]
    parts += [m.help for m in at.metric if m.help]
    return [str(p) for p in parts]
