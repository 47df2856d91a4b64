"""Operators: password hashes, roles, the account lookup, and `capsule operator add`."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tomllib
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from core.errors import PermissionDenied, ValidationError
from core.operators import (
    Operator,
    Role,
    authenticate,
    hash_password,
    needs_rehash,
    operator_for_email,
    parse_role,
    require,
    secrets_entry,
    validate_display_name,
    verify_password,
)
from tasks import cli

PASSWORD = "correct horse battery"


def legacy_scrypt_hash(password: str, n: int = 2**14) -> str:
    """What `capsule operator add` wrote before Argon2id."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, dklen=32)
    return f"scrypt${n}$8$1${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def test_hashes_are_argon2id_salted_and_old_scrypt_ones_still_verify() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first != second  # a fresh salt each time
    assert first.startswith("$argon2id$v=19$m=65536,t=3,p=4$") and PASSWORD not in first
    assert not needs_rehash(first)
    legacy = legacy_scrypt_hash(PASSWORD)
    assert verify_password(PASSWORD, legacy) and needs_rehash(legacy)
    assert not verify_password(PASSWORD + "!", legacy)
    assert not verify_password(PASSWORD, "$argon2id$garbage")
    assert verify_password(PASSWORD, first) and verify_password(PASSWORD, second)
    assert not verify_password(PASSWORD + "!", first)
    assert not verify_password(PASSWORD, "scrypt$garbage")
    assert not verify_password(PASSWORD, "pbkdf2$1$2$3$4$5")
    with pytest.raises(ValidationError):
        hash_password("short")


@pytest.mark.parametrize(
    ("role", "needed", "allowed"),
    [
        (Role.VIEWER, Role.VIEWER, True),
        (Role.VIEWER, Role.SUPPORT, False),
        (Role.SUPPORT, Role.SUPPORT, True),
        (Role.SUPPORT, Role.OPS, False),
        (Role.OPS, Role.SUPPORT, True),
    ],
)
def test_roles_are_ordered(role: Role, needed: Role, allowed: bool) -> None:
    operator = Operator("x", role)
    assert operator.can(needed) is allowed
    if allowed:
        require(operator, needed, "do it")
    else:
        with pytest.raises(PermissionDenied) as caught:
            require(operator, needed, "do it")
        assert (caught.value.actor, caught.value.action) == ("x", "do it")


def test_authenticate_local_accounts() -> None:
    accounts = {
        "sam": {"password_hash": hash_password(PASSWORD), "role": "Support", "name": "Sam"},
        "bad": {"password_hash": hash_password(PASSWORD), "role": "admin"},
    }
    assert authenticate(accounts, " sam ", PASSWORD) == Operator("sam", Role.SUPPORT, "Sam")
    assert authenticate(accounts, "sam", "wrong password") is None
    assert authenticate(accounts, "nobody", PASSWORD) is None
    assert authenticate(accounts, "bad", PASSWORD) is None  # unknown role: no access
    assert authenticate(accounts, "", "") is None


def test_oidc_roles_table() -> None:
    roles = {"Olga@Example.com": "ops", "eve@example.com": "root"}
    assert operator_for_email(roles, "olga@example.COM", "Olga", email_verified=True) == Operator(
        "olga@example.com", Role.OPS, "Olga", source="oidc"
    )
    assert operator_for_email(roles, "eve@example.com", email_verified=True) is None
    assert operator_for_email(roles, None, email_verified=True) is None


def test_oidc_roles_need_a_verified_email() -> None:
    # An unverified address is only what the user typed at the identity provider
    roles = {"olga@example.com": "ops"}
    assert operator_for_email(roles, "olga@example.com", "Olga") is None
    assert operator_for_email(roles, "olga@example.com", email_verified=False) is None
    with pytest.raises(ValidationError):
        parse_role("root")


def test_secrets_entry_is_valid_toml() -> None:
    text = secrets_entry("ada@example.com", Role.OPS, "scrypt$1", name='Ada "A"')
    parsed = tomllib.loads(text)
    assert parsed == {
        "operators": {
            "ada@example.com": {"role": "ops", "password_hash": "scrypt$1", "name": 'Ada "A"'}
        }
    }


def run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main(argv)


def test_cli_operator_add_prints_or_appends(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_cli(monkeypatch, ["operator", "add", "sam", "--role", "support"], PASSWORD + "\n") == 0
    )
    printed = tomllib.loads(capsys.readouterr().out)["operators"]["sam"]
    assert printed["role"] == "support" and verify_password(PASSWORD, printed["password_hash"])

    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[other]\nkey = "value"\n')
    argv = ["operator", "add", "olga", "--role", "ops", "--secrets", str(secrets)]
    assert run_cli(monkeypatch, argv, PASSWORD + "\n") == 0
    assert run_cli(monkeypatch, argv, PASSWORD + "\n") == cli.EXIT_ERROR  # no duplicate
    assert "already has [operators.olga]" in capsys.readouterr().err
    data = tomllib.loads(secrets.read_text())
    assert data["other"] == {"key": "value"}
    assert authenticate(data["operators"], "olga", PASSWORD) == Operator("olga", Role.OPS)
    assert secrets.stat().st_mode & 0o077 == 0

    bad = ["operator", "add", "a b", "--role", "ops"]
    assert run_cli(monkeypatch, bad, PASSWORD + "\n") == cli.EXIT_ERROR
    short = ["operator", "add", "vera", "--role", "viewer"]
    assert run_cli(monkeypatch, short, "short\n") == cli.EXIT_ERROR


@pytest.mark.parametrize(
    "name",
    [
        "Ada\nLovelace",
        "Ada\x00",
        "Ada\u202eecalevoL",  # a bidi override: shows as something else
        "Ada\u200b",  # zero-width space
        "A" * 201,
    ],
)
def test_display_names_are_checked_at_creation(
    monkeypatch: pytest.MonkeyPatch,
    console_env: object,
    capsys: pytest.CaptureFixture[str],
    name: str,
) -> None:
    # Given a name with a line break, a control or invisible character, or too long
    with pytest.raises(ValidationError):
        validate_display_name(name)
    # When an account or an operator is created with it
    argv = ["user", "add", "new@example.com", "--name", name, "--credits", "1"]
    assert run_cli(monkeypatch, argv, "") == cli.EXIT_ERROR
    operator_argv = ["operator", "add", "newop", "--role", "ops", "--name", name]
    assert run_cli(monkeypatch, operator_argv, PASSWORD + "\n") == cli.EXIT_ERROR
    # Then each is refused in one line, and nothing was written
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.startswith("capsule: error: the name ")
    engine = create_engine(os.environ["CAPSULE_DATABASE_URL"])
    with engine.connect() as conn:
        assert conn.scalar(text("select count(*) from users where email = 'new@example.com'")) == 0
    engine.dispose()


def test_markdown_looking_names_are_kept_as_typed() -> None:
    # Escaping at display is the defence; a name with brackets is a valid name
    name = "  [x](http://127.0.0.1:9/x) ![i](http://127.0.0.1:9/i.png)  "
    assert validate_display_name(name) == name.strip()
    assert validate_display_name("Ada Lovelace-Byron, Jr. 🙂 (née Byron)") != ""
