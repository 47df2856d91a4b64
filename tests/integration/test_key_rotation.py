"""`capsule keys rotate` goes past letters it cannot open, lists them, and exits 1."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from core.models import Letter
from tests.integration.test_cli import Cli


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    cli = Cli(tmp_path / "var")
    cli.ok("keys", "generate", "--id", "k1")
    cli.ok("db", "upgrade")
    cli.ok("user", "add", "ada@example.com", "--name", "Ada", "--credits", "5")
    return cli


def letters(cli: Cli) -> dict[str, tuple[str, bytes, bytes]]:
    engine = create_engine(f"sqlite:///{cli.var / 'capsule.db'}")
    with engine.connect() as conn:
        rows = conn.execute(
            select(Letter.id, Letter.key_id, Letter.subject_ciphertext, Letter.body_ciphertext)
        ).all()
    engine.dispose()
    return {str(r[0]): (r[1], r[2], r[3]) for r in rows}


def spoil(cli: Cli, letter_id: str, **values: object) -> None:
    engine = create_engine(f"sqlite:///{cli.var / 'capsule.db'}")
    with engine.begin() as conn:
        conn.execute(
            Letter.__table__.update()
            .where(Letter.__table__.c.id == uuid.UUID(letter_id))
            .values(**values)
        )
    engine.dispose()


def test_rotation_skips_and_lists_letters_it_cannot_open_and_rotates_the_rest(cli: Cli) -> None:
    # Given four letters under k1: one whose key is gone, one tampered
    for _ in range(4):
        assert cli.schedule().returncode == 0
    ids = sorted(letters(cli))
    gone, tampered = ids[1], ids[2]
    spoil(cli, gone, key_id="k0")
    body = letters(cli)[tampered][2]
    spoil(cli, tampered, body_ciphertext=body[:-1] + bytes([body[-1] ^ 1]))
    before = letters(cli)
    cli.ok("keys", "generate", "--id", "k2")

    # When the keys are rotated
    done = cli("keys", "rotate", "--batch-size", "1")

    # Then the two readable letters are rotated, the other two are left as they were and
    # listed by id with the reason, and the exit status says so
    assert done.returncode == 1, done.stderr
    assert "re-encrypted 2 letters under key k2; skipped 2" in done.stdout
    assert f"skipped letter {gone}: key 'k0' is not in the keyring" in done.stdout
    assert f"skipped letter {tampered}: fails authentication under key 'k1'" in done.stdout
    after = letters(cli)
    assert after[gone] == before[gone] and after[tampered] == before[tampered]
    assert {after[i][0] for i in ids if i not in (gone, tampered)} == {"k2"}

    # And a second run rotates nothing new and reports the same two, also as JSON
    again = cli("keys", "rotate", "--json")
    assert again.returncode == 1
    report = json.loads(again.stdout)
    assert report["rotated"] == 0 and report["active_key"] == "k2"
    assert sorted((s["letter_id"], s["reason"]) for s in report["skipped"]) == sorted(
        [(gone, "missing_key"), (tampered, "decryption")]
    )


def test_rotation_with_nothing_to_skip_exits_zero(cli: Cli) -> None:
    assert cli.schedule().returncode == 0
    cli.ok("keys", "generate", "--id", "k2")
    assert "re-encrypted 1 letters under key k2; skipped 0" in cli.ok("keys", "rotate")


def test_a_batch_size_below_one_is_refused(cli: Cli) -> None:
    done = cli("keys", "rotate", "--batch-size", "0")
    assert done.returncode == 2 and "--batch-size" in done.stderr
