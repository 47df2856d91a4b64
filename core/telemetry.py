"""Error reporting: Sentry, initialised once at process start and scrubbed before anything leaves.

Letter text never leaves the vault (DESIGN.md invariant 8), and neither do secrets. The SDK is
set up so that it collects little, and `before_send` / `before_breadcrumb` decide what of that
little may go out. What an event may carry:

    exception type, module, stack       file, function, line and our source lines; never the
                                        frames' variables (the Email and the decrypted letter
                                        live in them)
    exception message                   kept for exceptions whose text we write or whose text
                                        is an address, a path or a status: core.errors, OSError,
                                        httpx, redis, SQLAlchemy/psycopg, smtplib, huey; withheld
                                        for every other type (a ValueError from building a
                                        message may quote the header it choked on)
    log message                         the format string from our code; its arguments pass the
                                        rules above (an exception argument is judged by its type)
    extra                               only the fields named in SAFE_EXTRA (delivery_id, task_id,
                                        provider, outcome, ...)
    contexts                            only the SDK's own (os, runtime, trace)
    breadcrumbs                         category, level, time and the scrubbed message; no data

Every kept string is cut at URLs (scheme and host stay; user, password, path and query, where
webhook and heartbeat tokens live, go), has e-mail addresses masked and is shortened. Nothing
is taken from the request, the user, the process arguments (`capsule schedule --subject ...
--body ...` holds letter text in argv) or the environment.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import sentry_sdk
from sentry_sdk.integrations import Integration
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.excepthook import ExcepthookIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.integrations.modules import ModulesIntegration
from sentry_sdk.integrations.threading import ThreadingIntegration

from core.config import Settings

log = logging.getLogger(__name__)

MAX_TEXT = 500
WITHHELD = "[withheld]"

# Structured log fields that may travel as event extras and breadcrumb data.
SAFE_EXTRA = frozenset(
    {
        "delivery_id",
        "task_id",
        "provider",
        "outcome",
        "error_class",
        "status",
        "kind",
        "attempt",
        "component",
    }
)
SAFE_CONTEXTS = frozenset({"os", "runtime", "trace"})
# Exceptions whose message may be sent (after URL and address scrubbing): messages we compose
# ourselves, or made of addresses, paths and status codes by the library that raised them.
SAFE_EXCEPTION_MODULES = (
    "core.",
    "httpx",
    "httpcore",
    "redis",
    "sqlalchemy",
    "psycopg",
    "smtplib",
    "huey",
    "socket",
    "ssl",
)
SAFE_BUILTINS = frozenset(
    {
        "OSError",
        "PermissionError",
        "FileNotFoundError",
        "FileExistsError",
        "NotADirectoryError",
        "IsADirectoryError",
        "TimeoutError",
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        "InterruptedError",
        "BlockingIOError",
    }
)

_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^\s/@'\"<>]*@)?([^\s/?#'\"<>]*)[^\s'\"<>)\]]*")
_EMAIL = re.compile(r"[^\s@<>'\"(),;:]+@[^\s@<>'\"(),;:]+\.[A-Za-z]{2,}")
# The provider chain wraps an unexpected exception as "unexpected <Type>: <its message>".
_UNEXPECTED = re.compile(r"(unexpected [A-Za-z_][\w.]*): .*", re.S)

_lock = threading.Lock()
_initialised_dsn: str | None = None


def scrub_text(text: str, limit: int = MAX_TEXT) -> str:
    """A string fit to leave: URLs cut to scheme://host, addresses masked, foreign text withheld."""
    text = _UNEXPECTED.sub(rf"\1: {WITHHELD}", text)
    text = _URL.sub(lambda m: f"{m.group(1)}{m.group(2)}/…", text)
    text = _EMAIL.sub("<address>", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message_is_safe(type_name: str, module: str | None) -> bool:
    """Whether an exception's message may be reported (see the module docstring)."""
    module = module or "builtins"
    if module == "builtins":
        return type_name in SAFE_BUILTINS
    return module.startswith(SAFE_EXCEPTION_MODULES)


def exception_text(exc: BaseException) -> str:
    """`Type: message` with the message scrubbed, or withheld when the type is not trusted."""
    cls = type(exc)
    if message_is_safe(cls.__name__, cls.__module__):
        return f"{cls.__name__}: {scrub_text(str(exc))}"
    return f"{cls.__name__}: {WITHHELD}"


def _scrub_arg(arg: object) -> object:
    if isinstance(arg, BaseException):
        return exception_text(arg)
    if isinstance(arg, int | float | bool) or arg is None:
        return arg
    return scrub_text(str(arg))


def format_record_message(record: logging.LogRecord) -> str:
    """The record's message rebuilt from its format string and scrubbed arguments."""
    template = str(record.msg)
    args = record.args
    try:
        if isinstance(args, Mapping):
            return scrub_text(template % {k: _scrub_arg(v) for k, v in args.items()})
        if args:
            return scrub_text(template % tuple(_scrub_arg(a) for a in args))
    except (TypeError, ValueError, KeyError):
        return scrub_text(template)
    return scrub_text(template)


def _safe_extra(extra: Any) -> dict[str, Any]:
    if not isinstance(extra, Mapping):
        return {}
    kept: dict[str, Any] = {}
    for key, value in extra.items():
        if key in SAFE_EXTRA:
            kept[key] = _scrub_arg(value)
        elif key == "huey-job" and isinstance(value, Mapping):
            # From sentry-sdk's Huey integration: keep the task's name, not its arguments.
            kept[key] = {k: value[k] for k in ("task", "retry") if k in value}
    return kept


def _strip_frames(container: Any) -> None:
    if not isinstance(container, Mapping):
        return
    stacktrace = container.get("stacktrace")
    if isinstance(stacktrace, dict):
        for frame in stacktrace.get("frames") or []:
            if isinstance(frame, dict):
                frame.pop("vars", None)


def scrub_event(event: dict[str, Any], hint: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`before_send`: keep only what the module docstring allows."""
    for key in ("request", "user", "spans"):
        event.pop(key, None)
    for value in (event.get("exception") or {}).get("values") or []:
        if isinstance(value, dict):
            if not message_is_safe(str(value.get("type", "")), value.get("module")):
                value["value"] = WITHHELD
            elif isinstance(value.get("value"), str):
                value["value"] = scrub_text(value["value"])
            _strip_frames(value)
    for thread in (event.get("threads") or {}).get("values") or []:
        _strip_frames(thread)
    _strip_frames(event)
    record = (hint or {}).get("log_record")
    if "logentry" in event:
        if isinstance(record, logging.LogRecord):
            event["logentry"] = {
                "message": scrub_text(str(record.msg)),
                "formatted": format_record_message(record),
            }
        else:
            entry = event["logentry"] or {}
            event["logentry"] = {"message": scrub_text(str(entry.get("message", "")))}
    if isinstance(event.get("message"), str):
        event["message"] = scrub_text(event["message"])
    event["extra"] = _safe_extra(event.get("extra"))
    contexts = event.get("contexts")
    if isinstance(contexts, dict):
        event["contexts"] = {k: v for k, v in contexts.items() if k in SAFE_CONTEXTS}
    crumbs = event.get("breadcrumbs")
    if isinstance(crumbs, dict):
        crumbs["values"] = [
            _scrub_breadcrumb(c) for c in crumbs.get("values") or [] if isinstance(c, dict)
        ]
    return event


def _scrub_breadcrumb(crumb: dict[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {
        k: crumb[k] for k in ("type", "category", "level", "timestamp") if k in crumb
    }
    if isinstance(crumb.get("message"), str):
        kept["message"] = scrub_text(crumb["message"])
    data = _safe_extra(crumb.get("data"))
    if data:
        kept["data"] = data
    return kept


def scrub_breadcrumb(
    crumb: dict[str, Any], hint: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """`before_breadcrumb`: a log breadcrumb's message is rebuilt from scrubbed arguments."""
    record = (hint or {}).get("log_record")
    if isinstance(record, logging.LogRecord):
        crumb = dict(crumb, message=format_record_message(record))
    return _scrub_breadcrumb(crumb)


def init_sentry(
    settings: Settings,
    *,
    component: str,
    integrations: Iterable[Integration] = (),
) -> bool:
    """Start Sentry for this process if CAPSULE_SENTRY_DSN is set; safe to call more than once.

    Entry points call it at start (consumer startup hook, CLI main, console app). `integrations`
    lets an entry point add its own (the consumer adds Huey's; core imports no Huey). Returns
    whether Sentry is on.
    """
    global _initialised_dsn
    if not settings.sentry_dsn:
        return False
    with _lock:
        if (
            _initialised_dsn == settings.sentry_dsn.get_secret_value()
            and sentry_sdk.is_initialized()
        ):
            return True
        sentry_sdk.init(
            dsn=settings.sentry_dsn.get_secret_value(),
            # Only the integrations listed here: the default set includes argv (letter text
            # in `capsule schedule`), and auto-enabled ones record HTTP and SQL breadcrumbs.
            default_integrations=False,
            auto_enabling_integrations=False,
            integrations=[
                LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
                ExcepthookIntegration(),
                DedupeIntegration(),
                AtexitIntegration(),
                ModulesIntegration(),
                ThreadingIntegration(),
                *integrations,
            ],
            include_local_variables=False,
            send_default_pii=False,
            max_request_body_size="never",
            before_send=scrub_event,  # type: ignore[arg-type]
            before_breadcrumb=scrub_breadcrumb,
            traces_sample_rate=None,
            trace_propagation_targets=[],
            enable_logs=False,
        )
        # The global scope: every thread, including workers started before this call.
        sentry_sdk.get_global_scope().set_tag("component", component)
        _initialised_dsn = settings.sentry_dsn.get_secret_value()
    log.info("error reporting to Sentry is on (%s)", component)
    return True


def capture_message(message: str, *, level: str = "error") -> None:
    """Report `message` if Sentry was initialised at start; otherwise do nothing."""
    if sentry_sdk.is_initialized():
        sentry_sdk.capture_message(message, level=level)  # type: ignore[arg-type]
