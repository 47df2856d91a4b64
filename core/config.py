"""Settings: one frozen object read from CAPSULE_* environment variables once.

Each setting is declared once, as a field of `Settings`: its type, default, limits and
description. The variable is `CAPSULE_` + the field name in capitals. Every default runs the
embedded mode (SQLite, SqliteHuey, file outbox) under `var/`. A malformed value raises
ConfigError naming the variable, so a bad deploy fails at start rather than at 3 a.m.

`Settings.from_env()` reads the environment and, for secrets, files named like the variables in
`CAPSULE_SECRETS_DIR` (default `/run/secrets` when it exists: Docker and Kubernetes secrets); a
variable set in the environment wins over its file. `Settings(...)` itself reads nothing: it is
a plain value, as tests build it. Keys, tokens, passwords and URLs carrying them are
`SecretStr`: read them with `.get_secret_value()`; no repr or log line shows them.

`SETTINGS_DOC` (variable -> (default, description)) is derived from the fields;
`.env.example` mirrors it and a test keeps the two in step.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
)

from core.errors import ConfigError

PREFIX = "CAPSULE_"
KNOWN_PROVIDERS = ("resend", "postmark", "smtp", "outbox")
DEFAULT_SECRETS_DIR = Path("/run/secrets")


# ---------------------------------------------------------------- value parsers


def _comma_list(raw: object) -> object:
    if isinstance(raw, str):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    return raw


def _none_if_empty(raw: object) -> object:
    return None if raw == "" else raw


def _flag(raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _providers(names: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(n.lower() for n in names)
    if not names or any(n not in KNOWN_PROVIDERS for n in names):
        raise ValueError(
            f"expected a comma-separated list of {', '.join(KNOWN_PROVIDERS)}, "
            f"got {','.join(names)!r}"
        )
    return names


def _webhook_secrets(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """Svix signing secrets (`whsec_` + base64); several during a rotation."""
    for secret in secrets:
        try:
            encoded = secret.removeprefix("whsec_")
            padded = encoded + "=" * (-len(encoded) % 4)
            ok = secret.startswith("whsec_") and bool(base64.b64decode(padded, validate=True))
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise ValueError("expected whsec_<base64>[,whsec_<base64>...]")
    return secrets


def _credentials(pairs: tuple[str, ...]) -> tuple[str, ...]:
    """Basic auth user:password pairs; several during a rotation."""
    if any(not user or not password for user, _, password in (p.partition(":") for p in pairs)):
        raise ValueError("expected user:password[,user:password...]")
    return pairs


def _networks(networks: tuple[str, ...]) -> tuple[str, ...]:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not an IP address or network") from None
    return networks


def _normalised(transform: Callable[[str], str]) -> BeforeValidator:
    return BeforeValidator(lambda raw: transform(raw.strip()) if isinstance(raw, str) else raw)


Flag = Annotated[bool, BeforeValidator(_flag)]
OptionalStr = Annotated[str | None, BeforeValidator(_none_if_empty)]
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_none_if_empty)]
CommaList = Annotated[tuple[str, ...], BeforeValidator(_comma_list)]
Providers = Annotated[CommaList, AfterValidator(_providers)]
WebhookSecrets = Annotated[CommaList, AfterValidator(_webhook_secrets)]
Credentials = Annotated[CommaList, AfterValidator(_credentials)]
Networks = Annotated[CommaList, AfterValidator(_networks)]
LogFormat = Annotated[Literal["text", "json"], _normalised(str.lower)]
LogLevel = Annotated[
    Literal["", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], _normalised(str.upper)
]


# ---------------------------------------------------------------- the settings


class Settings(BaseSettings):
    """The whole configuration, validated. Build it with `Settings.from_env()`."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        frozen=True,
        extra="forbid",
        validate_default=True,
        enable_decoding=False,  # lists are comma-separated, never JSON
    )

    # ---- storage and queue
    var_dir: str = Field(
        "var", description="Directory for the embedded database, queue, outbox and keys."
    )
    database_url: SecretStr = Field(
        SecretStr(""), description="SQLAlchemy URL; empty = SQLite file var/capsule.db."
    )
    redis_url: OptionalStr = Field(
        None, description="Redis URL for the task queue; empty = SqliteHuey in var/."
    )
    huey_name: str = Field("capsule", description="Huey queue name (Redis key prefix).")
    encryption_keys: SecretStr = Field(
        SecretStr(""),
        description="Keyring 'id:base64key,...'; the last key encrypts. Empty = var/keys.",
    )
    secrets_dir: str = Field(
        "",
        description=(
            "Directory of secret files named like the variables (e.g. CAPSULE_SMTP_PASSWORD), as "
            "Docker and Kubernetes mount secrets; a variable set in the environment wins over its "
            "file. Empty = /run/secrets when it exists."
        ),
    )

    # ---- dispatch, retries and the backstop
    dispatch_horizon_seconds: int = Field(
        3600, gt=0, description="Only letters due within this get a queued task."
    )
    lease_seconds: int = Field(
        300, gt=0, description="How long a claimed delivery may stay processing."
    )
    lookup_settle_seconds: float = Field(
        120,
        ge=0,
        description=(
            "After an unknown outcome, a lagging search (Postmark) finding nothing is trusted "
            "only this long after the last ambiguous call; until then the letter waits, pinned."
        ),
    )
    grace_seconds: int = Field(
        60, ge=0, description="Due rows unclaimed this long are re-dispatched by the backstop."
    )
    max_attempts: int = Field(
        5, gt=0, description="Delivery runs before a transiently failing letter is marked failed."
    )
    backoff_base_seconds: float = Field(
        30, gt=0, description="First retry delay; doubles per attempt."
    )
    backoff_max_seconds: float = Field(3600, description="Upper bound of one retry delay.")
    retry_cooloff_seconds: int = Field(
        86400, description="Age before the failed retrier requeues a transient failure."
    )
    retry_max_total_attempts: int = Field(
        15, description="Total runs after which the failed retrier gives up."
    )
    backstop_batch_size: int = Field(500, gt=0, description="Rows per backstop batch.")
    backstop_budget_seconds: float = Field(40, description="Time budget of one backstop run.")
    missing_key_retry_seconds: int = Field(
        300,
        gt=0,
        description=(
            "A letter whose key is not in the keyring waits this long (plus a spread) before the "
            "next try."
        ),
    )
    marker_check_seconds: float = Field(
        2,
        ge=0,
        description=(
            "Each consumer checks the broker's marker this often; 0 = only the minute's dispatcher."
        ),
    )

    # ---- letters and users
    max_schedule_years: int = Field(
        50, gt=0, description="How far ahead a letter may be scheduled."
    )
    max_letter_bytes: int = Field(
        262144, gt=0, description="Largest subject + body accepted, in bytes (UTF-8)."
    )
    initial_credits: int = Field(0, description="Credits granted to a user created by the CLI.")
    bulk_max_rows: int = Field(10000, gt=0, description="Most rows one bulk operation may touch.")

    # ---- providers
    providers: Providers = Field(
        ("outbox",), description="Provider chain in failover order: resend, postmark, smtp, outbox."
    )
    mail_from: str = Field(
        "Capsule <letters@capsule.localhost>", description="From address of every email."
    )
    outbox_dir: str = Field("", description="Directory of the file outbox; empty = var/outbox.")
    resend_api_key: OptionalSecret = Field(None, description="Resend API key; set to use Resend.")
    resend_base_url: str = Field("https://api.resend.com", description="Resend API base URL.")
    postmark_server_token: OptionalSecret = Field(
        None, description="Postmark server token; set to use Postmark."
    )
    postmark_base_url: str = Field(
        "https://api.postmarkapp.com", description="Postmark API base URL."
    )
    postmark_message_stream: str = Field("outbound", description="Postmark message stream.")
    provider_connect_timeout: float = Field(5, description="Seconds to connect to a provider.")
    provider_read_timeout: float = Field(20, description="Seconds to wait for a provider's answer.")
    provider_rate_per_second: float = Field(
        50, gt=0, description="Sends per second per provider, shared by all consumers."
    )
    batch_size: int = Field(
        100,
        gt=0,
        description=(
            "Most letters one delivery run claims and sends in one provider call (1 = no "
            "batches); capped by the provider's own limit (Resend 100, Postmark 500)."
        ),
    )
    circuit_failure_threshold: int = Field(
        5, description="Consecutive failures that open a provider's circuit."
    )
    circuit_reset_seconds: float = Field(60, description="How long an open circuit stays open.")

    # ---- SMTP
    smtp_host: str = Field("localhost", description="SMTP server host.")
    smtp_port: int = Field(25, description="SMTP server port.")
    smtp_username: OptionalStr = Field(None, description="SMTP user; empty = no AUTH.")
    smtp_password: OptionalSecret = Field(None, description="SMTP password.")
    smtp_starttls: Flag = Field(False, description="Use STARTTLS.")

    # ---- database pool
    db_pool_size: int = Field(5, gt=0, description="PostgreSQL pool size per process.")
    db_max_overflow: int = Field(5, description="Extra connections beyond the pool.")
    db_pool_timeout: float = Field(10, description="Seconds to wait for a pooled connection.")
    db_pool_recycle: int = Field(1800, description="Seconds before a connection is replaced.")
    db_connect_timeout: int = Field(5, description="Seconds to open a PostgreSQL connection.")
    db_statement_timeout_ms: int = Field(30000, description="PostgreSQL statement timeout.")
    sqlite_busy_timeout_ms: int = Field(15000, description="SQLite busy timeout.")

    # ---- alerts and health
    alert_webhook_url: OptionalSecret = Field(
        None, description="Slack-compatible webhook for alerts."
    )
    alert_stuck_threshold: int = Field(
        10, description="Stuck rows in one backstop run that raise an alert."
    )
    alert_min_interval_seconds: int = Field(
        900, description="At most one alert per kind in this window."
    )
    heartbeat_url: OptionalSecret = Field(
        None, description="URL pinged after each successful backstop run."
    )
    health_max_age_seconds: int = Field(
        300, description="capsule health fails when the last backstop run is older."
    )
    health_max_stuck: int = Field(
        50, description="capsule health fails with more stuck rows than this."
    )

    # ---- observability
    sentry_dsn: OptionalSecret = Field(
        None,
        description=(
            "Sentry DSN: error reports from the consumer, the CLI and the console, scrubbed of "
            "letter text and secrets."
        ),
    )
    log_format: LogFormat = Field(
        "text",
        description=(
            "Log lines as text (Huey's format) or json (one object per line); every process."
        ),
    )
    log_level: LogLevel = Field(
        "",
        description=(
            "DEBUG, INFO, WARNING or ERROR; empty = consumer INFO, CLI and console WARNING."
        ),
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description=(
            "Port of each consumer's Prometheus /metrics; 0 = off. One port per process on a host."
        ),
    )
    metrics_addr: str = Field(
        "127.0.0.1",
        description="Address the consumer's and `capsule exporter`'s /metrics listen on.",
    )

    # ---- console
    demo_mode: Flag = Field(False, description="Console without login (embedded default only).")

    # ---- provider webhooks
    resend_webhook_secrets: WebhookSecrets = Field(
        (),
        description=(
            "Signing secrets (whsec_...) of the Resend webhook endpoint, comma-separated while "
            "one is rotated; empty = /webhooks/resend refuses everything."
        ),
    )
    postmark_webhook_credentials: Credentials = Field(
        (),
        description=(
            "Basic auth user:password pairs in the Postmark webhook URL, comma-separated while "
            "one is rotated; empty = /webhooks/postmark refuses everything."
        ),
    )
    postmark_webhook_allowed_ips: Networks = Field(
        (),
        description=(
            "Addresses or networks Postmark webhooks may come from (comma-separated); empty = any."
        ),
    )
    webhook_forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description=(
            "Proxies whose X-Forwarded-For the webhook receiver believes (uvicorn's "
            "forwarded_allow_ips)."
        ),
    )
    webhook_max_body_bytes: int = Field(262144, gt=0, description="Largest webhook body accepted.")
    webhook_grace_seconds: int = Field(
        60,
        ge=0,
        description=(
            "Stored webhook events still unprocessed after this are processed by the backstop."
        ),
    )

    def __repr__(self) -> str:
        # Keys and tokens must never reach a log line through a repr.
        queue = "redis" if self.redis_url else "sqlite"
        return f"Settings(database={self.database_kind}, queue={queue})"

    __str__ = __repr__

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `Settings(...)` takes only its arguments; `from_env` adds the environment and files.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every CAPSULE_* variable (and secret file)."""
        env = os.environ if environ is None else environ
        secrets_dir = _secrets_dir(env)
        values: dict[str, Any] = {}
        if secrets_dir is not None:
            values.update(SecretsSettingsSource(cls, secrets_dir=secrets_dir)())
        values.update(_EnvironSource(cls, env)())
        values["secrets_dir"] = str(secrets_dir or "")
        return cls._checked(values)

    def replace(self, **changes: Any) -> Settings:
        """A validated copy with some fields changed."""
        return self._checked({**dict(self), **changes})

    @classmethod
    def _checked(cls, values: dict[str, Any]) -> Settings:
        try:
            return cls(**values)
        except pydantic.ValidationError as exc:
            raise _config_error(exc) from None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        url = self.resolved_database_url
        if not url.startswith(("sqlite", "postgresql")):
            raise ConfigError(
                "CAPSULE_DATABASE_URL",
                f"expected a sqlite:// or postgresql:// URL, got {url.split(':')[0]!r}",
            )
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("CAPSULE_REDIS_URL", "expected a redis:// URL")
        for provider, key, variable in (
            ("resend", self.resend_api_key, "CAPSULE_RESEND_API_KEY"),
            ("postmark", self.postmark_server_token, "CAPSULE_POSTMARK_SERVER_TOKEN"),
        ):
            if provider in self.providers and not key:
                raise ConfigError(variable, f"required when {provider} is in CAPSULE_PROVIDERS")
        if self.demo_mode and not self.is_embedded:
            raise ConfigError(
                "CAPSULE_DEMO_MODE",
                "demo mode is allowed only on the embedded default (SQLite, no Redis)",
            )
        if self.demo_mode and self.providers != ("outbox",):
            raise ConfigError(
                "CAPSULE_DEMO_MODE",
                "demo mode sends only to the file outbox: set CAPSULE_PROVIDERS=outbox "
                f"(got {','.join(self.providers)})",
            )
        return self

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url.get_secret_value() or f"sqlite:///{self.var_path / 'capsule.db'}"

    @property
    def database_kind(self) -> str:
        return "postgresql" if self.resolved_database_url.startswith("postgresql") else "sqlite"

    @property
    def is_embedded(self) -> bool:
        return self.database_kind == "sqlite" and not self.redis_url

    @property
    def outbox_path(self) -> Path:
        return Path(self.outbox_dir) if self.outbox_dir else self.var_path / "outbox"

    @property
    def keys_path(self) -> Path:
        return self.var_path / "keys"

    @property
    def huey_sqlite_path(self) -> Path:
        return self.var_path / "huey.db"


# ---------------------------------------------------------------- reading and documenting


class _EnvironSource(EnvSettingsSource):
    """The CAPSULE_* variables of a given mapping (os.environ, or a test's dict)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Only the documented spelling counts: CAPSULE_LEASE_SECONDS, not capsule_lease_seconds.
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if name.startswith(PREFIX) and name.isupper()
        }


def _secrets_dir(env: Mapping[str, str]) -> Path | None:
    variable = "CAPSULE_SECRETS_DIR"
    if env.get(variable):
        path = Path(env[variable])
        if not path.is_dir():
            raise ConfigError(variable, f"{str(path)!r} is not a directory")
        return path
    return DEFAULT_SECRETS_DIR if DEFAULT_SECRETS_DIR.is_dir() else None


def _config_error(exc: pydantic.ValidationError) -> ConfigError:
    error = exc.errors()[0]
    variable = f"{PREFIX}{str(error['loc'][0]).upper()}" if error["loc"] else PREFIX
    if error["type"] == "value_error":
        return ConfigError(variable, str(error["ctx"]["error"]))
    return ConfigError(
        variable, f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {error['input']!r}"
    )


def _shown(value: object) -> str:
    """A default as written in an environment file."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(value)
    return "" if value is None else str(value)


SETTINGS_DOC: dict[str, tuple[str, str]] = {
    f"{PREFIX}{name.upper()}": (_shown(field.default), " ".join((field.description or "").split()))
    for name, field in Settings.model_fields.items()
}
