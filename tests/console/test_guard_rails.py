"""Console: letters waiting for a missing key on the health page; the bulk page's guard rails
(risky classes left out of "any class" unless chosen, with the single-row dialog's warning;
the row cap; one active operation per overlapping filter)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, select, update

from core.db import make_session_factory, session_scope
from core.models import Delivery, ErrorClass, Letter, Status
from tests.console.conftest import Runner, Seams
from tests.console.test_pages import VIEWER, texts


@pytest.fixture
def engine(console_env: Seams) -> Iterator[Engine]:
    engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    yield engine
    engine.dispose()


def test_health_page_names_the_missing_keys_and_how_many_letters_wait(
    console: Runner, engine: Engine
) -> None:
    # Given two scheduled letters a worker could not open: their key id is not in the keyring
    with session_scope(make_session_factory(engine)) as s:
        ids = s.scalars(
            select(Delivery.letter_id).where(Delivery.status == Status.SCHEDULED).limit(2)
        ).all()
        assert len(ids) == 2
        s.execute(update(Letter).where(Letter.id.in_(ids)).values(key_id="k-lost"))
        s.execute(
            update(Delivery)
            .where(Delivery.letter_id.in_(ids))
            .values(error_class=ErrorClass.MISSING_KEY)
        )
        s.commit()

    at = console(VIEWER, page="health")

    assert "2 letters wait for encryption keys missing from the keyring" in texts(at)
    table = next(d.value for d in at.dataframe if "key id" in d.value.columns)
    assert table.values.tolist() == [["k-lost", 2]]
