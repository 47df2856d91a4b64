"""Letter encryption: round trip, wrong key id, tampering, binding to the letter, rotation."""

from __future__ import annotations

import base64
import uuid

import pytest

from core.crypto import Keyring, generate_key_entry, load_keyring
from core.errors import ConfigError, CryptoError, DecryptionFailed, UnknownKeyId


def ring(*ids: str) -> Keyring:
    return Keyring.parse(",".join(generate_key_entry(i) for i in ids))


def test_round_trip_under_the_newest_key() -> None:
    keys = ring("old", "new")
    letter = uuid.uuid4()
    sealed = keys.seal(letter, "Subject ✉", "Dear future me — ünïcode")
    assert sealed.key_id == "new"
    assert keys.open(sealed.key_id, letter, sealed.subject, sealed.body) == (
        "Subject ✉",
        "Dear future me — ünïcode",
    )
    assert b"Dear" not in sealed.body


def test_unknown_key_id() -> None:
    sealed = ring("a").seal(uuid.uuid4(), "s", "b")
    with pytest.raises(UnknownKeyId, match="'zz'"):
        ring("a").open("zz", uuid.uuid4(), sealed.subject, sealed.body)


def test_tampered_ciphertext_and_wrong_letter_fail_authentication() -> None:
    keys = ring("a")
    letter = uuid.uuid4()
    sealed = keys.seal(letter, "s", "body")
    tampered = sealed.body[:-1] + bytes([sealed.body[-1] ^ 1])
    with pytest.raises(DecryptionFailed):
        keys.open("a", letter, sealed.subject, tampered)
    with pytest.raises(DecryptionFailed):
        keys.open("a", uuid.uuid4(), sealed.subject, sealed.body)  # bound to its letter id
    with pytest.raises(DecryptionFailed):
        keys.decrypt("a", letter, "body", sealed.subject)  # subject cannot pose as body


def test_same_id_different_key_material_fails() -> None:
    letter = uuid.uuid4()
    sealed = ring("a").seal(letter, "s", "b")
    with pytest.raises(DecryptionFailed):
        ring("a").open("a", letter, sealed.subject, sealed.body)


def test_repr_never_shows_key_material() -> None:
    entry = generate_key_entry("k1")
    keys = Keyring.parse(entry)
    assert entry.split(":")[1] not in repr(keys) and "k1" in repr(keys)


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "nokey",
        "a:not-base64!",
        f"a:{base64.b64encode(b'short').decode()}",
        "a:" + base64.b64encode(b"x" * 32).decode() + ",a:" + base64.b64encode(b"y" * 32).decode(),
    ],
)
def test_bad_keyring_specs_name_the_variable(spec: str) -> None:
    with pytest.raises(ConfigError, match="CAPSULE_ENCRYPTION_KEYS"):
        Keyring.parse(spec)


def test_load_keyring_from_file_or_explains_how_to_make_one(tmp_path) -> None:
    with pytest.raises(ConfigError, match="capsule keys generate"):
        load_keyring("", tmp_path / "keys")
    (tmp_path / "keys").write_text(generate_key_entry("f1") + "\n")
    assert load_keyring("", tmp_path / "keys").active_id == "f1"
    with pytest.raises(CryptoError):
        generate_key_entry("bad id!")
