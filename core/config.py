"""Settings: one frozen object read from CAPSULE_* environment variables once.

Every field has a default that runs the embedded mode (SQLite, SqliteHuey, file outbox) under
`var/`. A malformed value raises ConfigError naming the variable, so a bad deploy fails at start
rather than at 3 a.m. `SETTINGS_DOC` lists every variable; `.env.example` mirrors it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.errors import ConfigError

T = TypeVar("T")


def _int(variable: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(variable, f"expected an integer, got {raw!r}") from None


def _float(variable: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(variable, f"expected a number, got {raw!r}") from None


def _bool(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigError(variable, f"expected true or false, got {raw!r}")


def _str(variable: str, raw: str) -> str:
    return raw


def _optional(variable: str, raw: str) -> str | None:
    return raw or None


def _providers(variable: str, raw: str) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in raw.split(",") if p.strip())
    unknown = [n for n in names if n not in KNOWN_PROVIDERS]
    if not names or unknown:
        raise ConfigError(
            variable,
            f"expected a comma-separated list of {', '.join(KNOWN_PROVIDERS)}, got {raw!r}",
        )
    return names


KNOWN_PROVIDERS = ("resend", "postmark", "smtp", "outbox")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_format(variable: str, raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_FORMATS:
        raise ConfigError(variable, f"expected one of {', '.join(LOG_FORMATS)}, got {raw!r}")
    return value


def _log_level(variable: str, raw: str) -> str:
    value = raw.strip().upper()
    if value and value not in LOG_LEVELS:
        raise ConfigError(variable, f"expected one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


def _list(variable: str, raw: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in raw.split(",") if p.strip())


def _webhook_secrets(variable: str, raw: str) -> tuple[str, ...]:
    """Svix signing secrets (`whsec_` + base64); several during a rotation."""
    import base64
    import binascii

    secrets = _list(variable, raw)
    for secret in secrets:
        try:
            encoded = secret.removeprefix("whsec_")
            padded = encoded + "=" * (-len(encoded) % 4)
            ok = secret.startswith("whsec_") and bool(base64.b64decode(padded, validate=True))
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            raise ConfigError(variable, "expected whsec_<base64>[,whsec_<base64>...]")
    return secrets


def _credentials(variable: str, raw: str) -> tuple[str, ...]:
    """Basic auth user:password pairs; several during a rotation."""
    pairs = _list(variable, raw)
    if any(":" not in p or not p.split(":", 1)[0] or not p.split(":", 1)[1] for p in pairs):
        raise ConfigError(variable, "expected user:password[,user:password...]")
    return pairs


def _networks(variable: str, raw: str) -> tuple[str, ...]:
    import ipaddress

    networks = _list(variable, raw)
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(variable, f"{network!r} is not an IP address or network") from None
    return networks


# variable suffix -> (field name, parser, default, description)
_SPEC: list[tuple[str, str, Callable[[str, str], Any], str, str]] = [
    (
        "VAR_DIR",
        "var_dir",
        _str,
        "var",
        "Directory for the embedded database, queue, outbox and keys.",
    ),
    (
        "DATABASE_URL",
        "database_url",
        _str,
        "",
        "SQLAlchemy URL; empty = SQLite file var/capsule.db.",
    ),
    (
        "REDIS_URL",
        "redis_url",
        _optional,
        "",
        "Redis URL for the task queue; empty = SqliteHuey in var/.",
    ),
    ("HUEY_NAME", "huey_name", _str, "capsule", "Huey queue name (Redis key prefix)."),
    (
        "ENCRYPTION_KEYS",
        "encryption_keys",
        _str,
        "",
        "Keyring 'id:base64key,...'; the last key encrypts. Empty = var/keys.",
    ),
    (
        "DISPATCH_HORIZON_SECONDS",
        "dispatch_horizon_seconds",
        _int,
        "3600",
        "Only letters due within this get a queued task.",
    ),
    (
        "LEASE_SECONDS",
        "lease_seconds",
        _int,
        "300",
        "How long a claimed delivery may stay processing.",
    ),
    (
        "LOOKUP_SETTLE_SECONDS",
        "lookup_settle_seconds",
        _float,
        "120",
        "After an unknown outcome, a lagging search (Postmark) finding nothing is trusted only "
        "this long after the last ambiguous call; until then the letter waits, pinned.",
    ),
    (
        "GRACE_SECONDS",
        "grace_seconds",
        _int,
        "60",
        "Due rows unclaimed this long are re-dispatched by the backstop.",
    ),
    (
        "MAX_ATTEMPTS",
        "max_attempts",
        _int,
        "5",
        "Delivery runs before a transiently failing letter is marked failed.",
    ),
    (
        "BACKOFF_BASE_SECONDS",
        "backoff_base_seconds",
        _float,
        "30",
        "First retry delay; doubles per attempt.",
    ),
    (
        "BACKOFF_MAX_SECONDS",
        "backoff_max_seconds",
        _float,
        "3600",
        "Upper bound of one retry delay.",
    ),
    (
        "RETRY_COOLOFF_SECONDS",
        "retry_cooloff_seconds",
        _int,
        "86400",
        "Age before the failed retrier requeues a transient failure.",
    ),
    (
        "RETRY_MAX_TOTAL_ATTEMPTS",
        "retry_max_total_attempts",
        _int,
        "15",
        "Total runs after which the failed retrier gives up.",
    ),
    ("BACKSTOP_BATCH_SIZE", "backstop_batch_size", _int, "500", "Rows per backstop batch."),
    (
        "BACKSTOP_BUDGET_SECONDS",
        "backstop_budget_seconds",
        _float,
        "40",
        "Time budget of one backstop run.",
    ),
    (
        "MAX_SCHEDULE_YEARS",
        "max_schedule_years",
        _int,
        "50",
        "How far ahead a letter may be scheduled.",
    ),
    (
        "MAX_LETTER_BYTES",
        "max_letter_bytes",
        _int,
        "262144",
        "Largest subject + body accepted, in bytes (UTF-8).",
    ),
    (
        "INITIAL_CREDITS",
        "initial_credits",
        _int,
        "0",
        "Credits granted to a user created by the CLI.",
    ),
    (
        "PROVIDERS",
        "providers",
        _providers,
        "outbox",
        "Provider chain in failover order: resend, postmark, smtp, outbox.",
    ),
    (
        "MAIL_FROM",
        "mail_from",
        _str,
        "Capsule <letters@capsule.localhost>",
        "From address of every email.",
    ),
    ("OUTBOX_DIR", "outbox_dir", _str, "", "Directory of the file outbox; empty = var/outbox."),
    ("RESEND_API_KEY", "resend_api_key", _optional, "", "Resend API key; set to use Resend."),
    ("RESEND_BASE_URL", "resend_base_url", _str, "https://api.resend.com", "Resend API base URL."),
    (
        "POSTMARK_SERVER_TOKEN",
        "postmark_server_token",
        _optional,
        "",
        "Postmark server token; set to use Postmark.",
    ),
    (
        "POSTMARK_BASE_URL",
        "postmark_base_url",
        _str,
        "https://api.postmarkapp.com",
        "Postmark API base URL.",
    ),
    (
        "POSTMARK_MESSAGE_STREAM",
        "postmark_message_stream",
        _str,
        "outbound",
        "Postmark message stream.",
    ),
    ("SMTP_HOST", "smtp_host", _str, "localhost", "SMTP server host."),
    ("SMTP_PORT", "smtp_port", _int, "25", "SMTP server port."),
    ("SMTP_USERNAME", "smtp_username", _optional, "", "SMTP user; empty = no AUTH."),
    ("SMTP_PASSWORD", "smtp_password", _optional, "", "SMTP password."),
    ("SMTP_STARTTLS", "smtp_starttls", _bool, "false", "Use STARTTLS."),
    (
        "PROVIDER_CONNECT_TIMEOUT",
        "provider_connect_timeout",
        _float,
        "5",
        "Seconds to connect to a provider.",
    ),
    (
        "PROVIDER_READ_TIMEOUT",
        "provider_read_timeout",
        _float,
        "20",
        "Seconds to wait for a provider's answer.",
    ),
    (
        "PROVIDER_RATE_PER_SECOND",
        "provider_rate_per_second",
        _float,
        "50",
        "Sends per second per provider, shared by all consumers.",
    ),
    (
        "BATCH_SIZE",
        "batch_size",
        _int,
        "100",
        "Most letters one delivery run claims and sends in one provider call (1 = no batches);"
        " capped by the provider's own limit (Resend 100, Postmark 500).",
    ),
    (
        "CIRCUIT_FAILURE_THRESHOLD",
        "circuit_failure_threshold",
        _int,
        "5",
        "Consecutive failures that open a provider's circuit.",
    ),
    (
        "CIRCUIT_RESET_SECONDS",
        "circuit_reset_seconds",
        _float,
        "60",
        "How long an open circuit stays open.",
    ),
    ("DB_POOL_SIZE", "db_pool_size", _int, "5", "PostgreSQL pool size per process."),
    ("DB_MAX_OVERFLOW", "db_max_overflow", _int, "5", "Extra connections beyond the pool."),
    (
        "DB_POOL_TIMEOUT",
        "db_pool_timeout",
        _float,
        "10",
        "Seconds to wait for a pooled connection.",
    ),
    (
        "DB_POOL_RECYCLE",
        "db_pool_recycle",
        _int,
        "1800",
        "Seconds before a connection is replaced.",
    ),
    (
        "DB_CONNECT_TIMEOUT",
        "db_connect_timeout",
        _int,
        "5",
        "Seconds to open a PostgreSQL connection.",
    ),
    (
        "DB_STATEMENT_TIMEOUT_MS",
        "db_statement_timeout_ms",
        _int,
        "30000",
        "PostgreSQL statement timeout.",
    ),
    ("SQLITE_BUSY_TIMEOUT_MS", "sqlite_busy_timeout_ms", _int, "15000", "SQLite busy timeout."),
    (
        "ALERT_WEBHOOK_URL",
        "alert_webhook_url",
        _optional,
        "",
        "Slack-compatible webhook for alerts.",
    ),
    (
        "ALERT_STUCK_THRESHOLD",
        "alert_stuck_threshold",
        _int,
        "10",
        "Stuck rows in one backstop run that raise an alert.",
    ),
    (
        "ALERT_MIN_INTERVAL_SECONDS",
        "alert_min_interval_seconds",
        _int,
        "900",
        "At most one alert per kind in this window.",
    ),
    (
        "HEARTBEAT_URL",
        "heartbeat_url",
        _optional,
        "",
        "URL pinged after each successful backstop run.",
    ),
    (
        "SENTRY_DSN",
        "sentry_dsn",
        _optional,
        "",
        "Sentry DSN: error reports from the consumer, the CLI and the console, scrubbed of letter text and secrets.",
    ),
    (
        "LOG_FORMAT",
        "log_format",
        _log_format,
        "text",
        "Log lines as text (Huey's format) or json (one object per line); every process.",
    ),
    (
        "LOG_LEVEL",
        "log_level",
        _log_level,
        "",
        "DEBUG, INFO, WARNING or ERROR; empty = consumer INFO, CLI and console WARNING.",
    ),
    (
        "METRICS_PORT",
        "metrics_port",
        _int,
        "0",
        "Port of each consumer's Prometheus /metrics; 0 = off. One port per process on a host.",
    ),
    (
        "METRICS_ADDR",
        "metrics_addr",
        _str,
        "127.0.0.1",
        "Address the consumer's and `capsule exporter`'s /metrics listen on.",
    ),
    (
        "HEALTH_MAX_AGE_SECONDS",
        "health_max_age_seconds",
        _int,
        "300",
        "capsule health fails when the last backstop run is older.",
    ),
    (
        "HEALTH_MAX_STUCK",
        "health_max_stuck",
        _int,
        "50",
        "capsule health fails with more stuck rows than this.",
    ),
    ("DEMO_MODE", "demo_mode", _bool, "false", "Console without login (embedded default only)."),
    (
        "MISSING_KEY_RETRY_SECONDS",
        "missing_key_retry_seconds",
        _int,
        "300",
        "A letter whose key is not in the keyring waits this long (plus a spread) before the next try.",
    ),
    (
        "BULK_MAX_ROWS",
        "bulk_max_rows",
        _int,
        "10000",
        "Most rows one bulk operation may touch.",
    ),
    (
        "RESEND_WEBHOOK_SECRETS",
        "resend_webhook_secrets",
        _webhook_secrets,
        "",
        "Signing secrets (whsec_...) of the Resend webhook endpoint, comma-separated while one "
        "is rotated; empty = /webhooks/resend refuses everything.",
    ),
    (
        "POSTMARK_WEBHOOK_CREDENTIALS",
        "postmark_webhook_credentials",
        _credentials,
        "",
        "Basic auth user:password pairs in the Postmark webhook URL, comma-separated while one "
        "is rotated; empty = /webhooks/postmark refuses everything.",
    ),
    (
        "POSTMARK_WEBHOOK_ALLOWED_IPS",
        "postmark_webhook_allowed_ips",
        _networks,
        "",
        "Addresses or networks Postmark webhooks may come from (comma-separated); empty = any.",
    ),
    (
        "WEBHOOK_FORWARDED_ALLOW_IPS",
        "webhook_forwarded_allow_ips",
        _str,
        "127.0.0.1",
        "Proxies whose X-Forwarded-For the webhook receiver believes (uvicorn's "
        "forwarded_allow_ips).",
    ),
    (
        "WEBHOOK_MAX_BODY_BYTES",
        "webhook_max_body_bytes",
        _int,
        "262144",
        "Largest webhook body accepted.",
    ),
    (
        "WEBHOOK_GRACE_SECONDS",
        "webhook_grace_seconds",
        _int,
        "60",
        "Stored webhook events still unprocessed after this are processed by the backstop.",
    ),
    (
        "MARKER_CHECK_SECONDS",
        "marker_check_seconds",
        _float,
        "2",
        "Each consumer checks the broker's marker this often; 0 = only the minute's dispatcher.",
    ),
]

SETTINGS_DOC: dict[str, tuple[str, str]] = {
    f"CAPSULE_{suffix}": (default, doc) for suffix, _, _, default, doc in _SPEC
}


@dataclass(frozen=True)
class Settings:
    """The whole configuration, validated. Build it with `Settings.from_env()`."""

    var_dir: str = "var"
    database_url: str = ""
    redis_url: str | None = None
    huey_name: str = "capsule"
    encryption_keys: str = ""
    dispatch_horizon_seconds: int = 3600
    lease_seconds: int = 300
    lookup_settle_seconds: float = 120
    grace_seconds: int = 60
    max_attempts: int = 5
    backoff_base_seconds: float = 30
    backoff_max_seconds: float = 3600
    retry_cooloff_seconds: int = 86400
    retry_max_total_attempts: int = 15
    backstop_batch_size: int = 500
    backstop_budget_seconds: float = 40
    max_schedule_years: int = 50
    max_letter_bytes: int = 262144
    initial_credits: int = 0
    providers: tuple[str, ...] = ("outbox",)
    mail_from: str = "Capsule <letters@capsule.localhost>"
    outbox_dir: str = ""
    resend_api_key: str | None = None
    resend_base_url: str = "https://api.resend.com"
    postmark_server_token: str | None = None
    postmark_base_url: str = "https://api.postmarkapp.com"
    postmark_message_stream: str = "outbound"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = field(default=None, repr=False)
    smtp_starttls: bool = False
    provider_connect_timeout: float = 5
    provider_read_timeout: float = 20
    provider_rate_per_second: float = 50
    batch_size: int = 100
    circuit_failure_threshold: int = 5
    circuit_reset_seconds: float = 60
    db_pool_size: int = 5
    db_max_overflow: int = 5
    db_pool_timeout: float = 10
    db_pool_recycle: int = 1800
    db_connect_timeout: int = 5
    db_statement_timeout_ms: int = 30000
    sqlite_busy_timeout_ms: int = 15000
    alert_webhook_url: str | None = None
    alert_stuck_threshold: int = 10
    alert_min_interval_seconds: int = 900
    heartbeat_url: str | None = None
    sentry_dsn: str | None = None
    log_format: str = "text"
    log_level: str = ""
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    health_max_age_seconds: int = 300
    health_max_stuck: int = 50
    demo_mode: bool = False
    missing_key_retry_seconds: int = 300
    bulk_max_rows: int = 10000
    marker_check_seconds: float = 2
    resend_webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    postmark_webhook_credentials: tuple[str, ...] = field(default=(), repr=False)
    postmark_webhook_allowed_ips: tuple[str, ...] = ()
    webhook_forwarded_allow_ips: str = "127.0.0.1"
    webhook_max_body_bytes: int = 262144
    webhook_grace_seconds: int = 60

    def __repr__(self) -> str:
        # Keys and tokens must never reach a log line through a repr.
        return f"Settings(database={self.database_kind}, queue={'redis' if self.redis_url else 'sqlite'})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every CAPSULE_* variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for suffix, name, parse, default, _ in _SPEC:
            variable = f"CAPSULE_{suffix}"
            values[name] = parse(variable, env.get(variable, default))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        positive = {
            "DISPATCH_HORIZON_SECONDS": self.dispatch_horizon_seconds,
            "LEASE_SECONDS": self.lease_seconds,
            "MAX_ATTEMPTS": self.max_attempts,
            "BACKOFF_BASE_SECONDS": self.backoff_base_seconds,
            "BACKSTOP_BATCH_SIZE": self.backstop_batch_size,
            "MAX_SCHEDULE_YEARS": self.max_schedule_years,
            "MAX_LETTER_BYTES": self.max_letter_bytes,
            "PROVIDER_RATE_PER_SECOND": self.provider_rate_per_second,
            "BATCH_SIZE": self.batch_size,
            "DB_POOL_SIZE": self.db_pool_size,
            "MISSING_KEY_RETRY_SECONDS": self.missing_key_retry_seconds,
            "BULK_MAX_ROWS": self.bulk_max_rows,
            "WEBHOOK_MAX_BODY_BYTES": self.webhook_max_body_bytes,
        }
        for suffix, value in positive.items():
            if value <= 0:
                raise ConfigError(f"CAPSULE_{suffix}", f"must be positive, got {value}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                "CAPSULE_METRICS_PORT", f"expected 0 to 65535, got {self.metrics_port}"
            )
        if self.grace_seconds < 0:
            raise ConfigError("CAPSULE_GRACE_SECONDS", "must not be negative")
        if self.lookup_settle_seconds < 0:
            raise ConfigError("CAPSULE_LOOKUP_SETTLE_SECONDS", "must not be negative")
        if self.webhook_grace_seconds < 0:
            raise ConfigError("CAPSULE_WEBHOOK_GRACE_SECONDS", "must not be negative")
        if self.marker_check_seconds < 0:
            raise ConfigError("CAPSULE_MARKER_CHECK_SECONDS", "must not be negative")
        url = self.resolved_database_url
        if not (url.startswith("sqlite") or url.startswith("postgresql")):
            raise ConfigError(
                "CAPSULE_DATABASE_URL",
                f"expected a sqlite:// or postgresql:// URL, got {url.split(':')[0]!r}",
            )
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("CAPSULE_REDIS_URL", "expected a redis:// URL")
        if "resend" in self.providers and not self.resend_api_key:
            raise ConfigError(
                "CAPSULE_RESEND_API_KEY", "required when resend is in CAPSULE_PROVIDERS"
            )
        if "postmark" in self.providers and not self.postmark_server_token:
            raise ConfigError(
                "CAPSULE_POSTMARK_SERVER_TOKEN", "required when postmark is in CAPSULE_PROVIDERS"
            )
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

    @property
    def var_path(self) -> Path:
        return Path(self.var_dir)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_path / 'capsule.db'}"

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
