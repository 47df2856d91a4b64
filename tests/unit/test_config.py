"""Settings come from CAPSULE_* variables once; a bad value names its variable."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from core.config import SETTINGS_DOC, Settings
from core.errors import ConfigError


def test_defaults_are_the_embedded_mode() -> None:
    settings = Settings.from_env({})
    assert settings.is_embedded and settings.database_kind == "sqlite"
    assert settings.resolved_database_url == "sqlite:///var/capsule.db"
    assert settings.providers == ("outbox",)
    assert settings.dispatch_horizon_seconds == 3600


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "CAPSULE_DATABASE_URL": "postgresql://u@h/db",
            "CAPSULE_REDIS_URL": "redis://localhost:6379/0",
            "CAPSULE_PROVIDERS": "resend, postmark",
            "CAPSULE_RESEND_API_KEY": "re_x",
            "CAPSULE_POSTMARK_SERVER_TOKEN": "pm",
            "CAPSULE_SMTP_STARTTLS": "yes",
            "CAPSULE_BACKOFF_BASE_SECONDS": "2.5",
        }
    )
    assert settings.providers == ("resend", "postmark")
    assert settings.smtp_starttls and settings.backoff_base_seconds == 2.5
    assert not settings.is_embedded


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"CAPSULE_LEASE_SECONDS": "ten"}, "CAPSULE_LEASE_SECONDS"),
        ({"CAPSULE_LEASE_SECONDS": "0"}, "CAPSULE_LEASE_SECONDS"),
        ({"CAPSULE_SMTP_STARTTLS": "maybe"}, "CAPSULE_SMTP_STARTTLS"),
        ({"CAPSULE_PROVIDERS": "pigeon"}, "CAPSULE_PROVIDERS"),
        ({"CAPSULE_PROVIDERS": "resend"}, "CAPSULE_RESEND_API_KEY"),
        ({"CAPSULE_DATABASE_URL": "mysql://x"}, "CAPSULE_DATABASE_URL"),
        ({"CAPSULE_REDIS_URL": "localhost:6379"}, "CAPSULE_REDIS_URL"),
        ({"CAPSULE_DEMO_MODE": "true", "CAPSULE_REDIS_URL": "redis://x"}, "CAPSULE_DEMO_MODE"),
        ({"CAPSULE_BACKOFF_MAX_SECONDS": "1e"}, "CAPSULE_BACKOFF_MAX_SECONDS"),
        ({"CAPSULE_LOG_FORMAT": "xml"}, "CAPSULE_LOG_FORMAT"),
        ({"CAPSULE_LOG_LEVEL": "loud"}, "CAPSULE_LOG_LEVEL"),
        ({"CAPSULE_METRICS_PORT": "70000"}, "CAPSULE_METRICS_PORT"),
    ],
)
def test_invalid_values_fail_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable and str(caught.value).startswith(variable)


def test_repr_hides_secrets_and_every_variable_is_documented() -> None:
    settings = Settings.from_env(
        {"CAPSULE_SMTP_PASSWORD": "hunter2", "CAPSULE_ENCRYPTION_KEYS": "k:abc"}
    )
    assert "hunter2" not in repr(settings) and "abc" not in repr(settings)
    assert all(doc for _, doc in SETTINGS_DOC.values())
    assert len(SETTINGS_DOC) == len(Settings.model_fields)


def test_secret_files_are_read_and_the_environment_wins(tmp_path: Path) -> None:
    # Given Docker-style secret files named like the variables
    (tmp_path / "CAPSULE_SMTP_PASSWORD").write_text("hunter2\n")
    (tmp_path / "CAPSULE_LEASE_SECONDS").write_text("120\n")
    # When the environment points at them and also sets one of the two
    settings = Settings.from_env(
        {"CAPSULE_SECRETS_DIR": str(tmp_path), "CAPSULE_LEASE_SECONDS": "90"}
    )
    # Then the file fills what the environment leaves out, and the secret stays hidden
    assert settings.smtp_password is not None
    assert settings.smtp_password.get_secret_value() == "hunter2"
    assert settings.lease_seconds == 90
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)


def test_a_malformed_secret_file_or_directory_names_its_variable(tmp_path: Path) -> None:
    (tmp_path / "CAPSULE_BATCH_SIZE").write_text("lots")
    with pytest.raises(ConfigError, match="^CAPSULE_BATCH_SIZE"):
        Settings.from_env({"CAPSULE_SECRETS_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="^CAPSULE_SECRETS_DIR"):
        Settings.from_env({"CAPSULE_SECRETS_DIR": str(tmp_path / "missing")})


def test_replace_validates_and_settings_stay_frozen() -> None:
    settings = Settings.from_env({})
    assert settings.replace(batch_size=7).batch_size == 7 and settings.batch_size == 100
    with pytest.raises(ConfigError, match="^CAPSULE_BATCH_SIZE"):
        settings.replace(batch_size=0)
    with pytest.raises(pydantic.ValidationError):
        settings.batch_size = 7  # type: ignore[misc]
