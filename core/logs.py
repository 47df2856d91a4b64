"""Logging, configured the same way in every process: the consumer (Huey's own loggers
included), the `capsule` CLI and the console.

    CAPSULE_LOG_FORMAT  text (default) | json: one JSON object per line (python-json-logger)
    CAPSULE_LOG_LEVEL   DEBUG | INFO | WARNING | ERROR; empty = the process's default
                        (consumer: INFO, or Huey's -v / -q; CLI and console: WARNING)

One handler on the root logger writes to stderr; every other logger propagates to it. Lines
logged while a delivery runs carry `delivery_id` and `task_id` (set by `delivery_context`),
and the run's own line adds `provider` and `outcome`, as fields in JSON and as `key=value` in
text. Tracebacks keep their frames, but an exception's message is printed only for types whose
text cannot hold letter text (`core.telemetry.exception_text`); httpx's request lines, which
carry webhook and heartbeat URLs with their tokens, are kept below INFO.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from core.config import Settings

FIELDS = ("delivery_id", "task_id", "provider", "outcome")
TEXT_FORMAT = "[%(asctime)s] %(levelname)s:%(name)s:%(threadName)s:%(message)s"
QUIET = ("httpx", "httpcore", "urllib3", "watchdog")

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "capsule_log_context", default=None
)
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


@contextlib.contextmanager
def delivery_context(delivery_id: str, task_id: str) -> Iterator[None]:
    """Every line logged inside carries this delivery's id and task id."""
    token = _context.set({"delivery_id": delivery_id, "task_id": task_id})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the delivery context onto each record, so both formatters see the fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def format_exception(ei: Any) -> str:
    """A traceback whose exception lines pass `exception_text` (chained causes included)."""
    from core.telemetry import exception_text  # imports sentry-sdk: only when needed

    exc = ei[1] if isinstance(ei, tuple) else None
    if exc is None:
        return ""
    parts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.insert(
            0,
            "Traceback (most recent call last):\n"
            + "".join(traceback.format_tb(exc.__traceback__))
            + exception_text(exc),
        )
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n\nThe above exception was the direct cause of the following exception:\n\n".join(
        parts
    )


class TextFormatter(logging.Formatter):
    """Huey's familiar line, then the delivery fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{k}={getattr(record, k)}" for k in FIELDS if getattr(record, k, None) is not None
        )
        if not fields:
            return line
        head, sep, tail = line.partition("\n")
        return f"{head} {fields}{sep}{tail}"

    def formatException(self, ei: Any) -> str:
        return format_exception(ei)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per line: time, level, logger, thread, message, the fields, exc_info."""

    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(threadName)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "threadName": "thread"},
            timestamp=True,
        )

    def formatException(self, ei: Any) -> str:
        return format_exception(ei)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _level(settings: Settings, default: str | int) -> int:
    name = settings.log_level or default
    if isinstance(name, int):
        return name
    level = logging.getLevelName(name.upper())
    return level if isinstance(level, int) else logging.INFO


def configure_logging(settings: Settings, *, default_level: str | int) -> None:
    """Install the one root handler (replacing an earlier one of ours); idempotent."""
    root = logging.getLogger()
    level = _level(settings, default_level)
    wanted = (settings.log_format, level)
    for handler in list(root.handlers):
        if getattr(handler, "_capsule", None) == wanted and root.level == level:
            return
        if getattr(handler, "_capsule", None) is not None:
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler._capsule = wanted  # type: ignore[attr-defined]
    handler.setFormatter(
        JsonLineFormatter() if settings.log_format == "json" else TextFormatter(TEXT_FORMAT)
    )
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Huey's loggers propagate to the root handler instead of printing their own lines.
    huey = logging.getLogger("huey")
    for other in list(huey.handlers):
        huey.removeHandler(other)
    huey.setLevel(logging.NOTSET)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
