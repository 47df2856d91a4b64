"""The Sentry scrubbers: what an event or breadcrumb may carry (core/telemetry.py docstring)."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from sentry_sdk.utils import event_from_exception

from core import telemetry
from core.errors import TransientProviderError

SUBJECT = "Zebra quartz lantern"
BODY = "Marmalade octopus bridge"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "post https://hooks.example.com/services/T0/B0/SECRET failed",
            "https://hooks.example.com/…",
        ),
        ("ping http://u:pw@hb.example.com:8080/p?token=SECRET", "http://hb.example.com:8080/…"),
        ("to ada@example.com refused", "to <address> refused"),
        (f"unexpected ValueError: bad header {SUBJECT}", "unexpected ValueError: [withheld]"),
    ],
)
def test_scrub_text_cuts_urls_masks_addresses_and_withholds_wrapped_messages(
    text: str, expected: str
) -> None:
    scrubbed = telemetry.scrub_text(text)
    assert expected in scrubbed
    assert "SECRET" not in scrubbed and SUBJECT not in scrubbed and "pw" not in scrubbed


def _event_with_letter_in_frames_and_message() -> tuple[dict, dict]:
    def build(subject: str, body: str) -> None:
        raise ValueError(f"cannot encode header {subject!r}")

    try:
        build(SUBJECT, BODY)
    except ValueError:
        # the SDK's worst case: local variables attached
        event, hint = event_from_exception(
            sys.exc_info(),
            client_options={
                "include_local_variables": True,
                "include_source_context": True,
                "max_value_length": 1024,
                "add_full_stack": False,
                "max_stack_frames": 100,
                "in_app_include": [],
                "in_app_exclude": [],
                "project_root": None,
                "custom_repr": None,
            },
        )
    return event, hint


def test_scrub_event_drops_frame_variables_and_withholds_foreign_messages() -> None:
    event, hint = _event_with_letter_in_frames_and_message()
    event["extra"] = {"sys.argv": ["capsule", "--subject", SUBJECT], "delivery_id": "d-1"}
    event["contexts"] = {"runtime": {"name": "CPython"}, "letter": {"body": BODY}}
    event["request"] = {"data": BODY}
    assert SUBJECT in json.dumps(event, default=str)  # the hazard is real

    scrubbed = telemetry.scrub_event(event, hint)

    text = json.dumps(scrubbed, default=str)
    assert SUBJECT not in text and BODY not in text
    [value] = scrubbed["exception"]["values"]
    assert value["type"] == "ValueError" and value["value"] == telemetry.WITHHELD
    assert value["stacktrace"]["frames"]  # the stack stays, without variables
    assert scrubbed["extra"] == {"delivery_id": "d-1"}
    assert scrubbed["contexts"] == {"runtime": {"name": "CPython"}}


def test_scrub_event_keeps_our_own_error_messages_scrubbed() -> None:
    try:
        raise TransientProviderError("resend", "503 from https://api.example.com/emails?k=SECRET")
    except TransientProviderError:
        event, hint = event_from_exception(sys.exc_info())
    scrubbed = telemetry.scrub_event(event, hint)
    [value] = scrubbed["exception"]["values"]
    assert "503 from https://api.example.com/…" in value["value"]
    assert "SECRET" not in value["value"]  # (the source context shows this test's own line)


def test_log_messages_and_breadcrumbs_are_rebuilt_from_scrubbed_arguments() -> None:
    record = logging.LogRecord(
        "core.providers.chain",
        logging.WARNING,
        __file__,
        1,
        "send via %s failed: %s (hook %s)",
        ("outbox", ValueError(f"bad {SUBJECT}"), "https://h.example.com/T/SECRET"),
        None,
    )
    record.delivery_id = "d-1"
    record.letter = BODY
    crumb = {
        "type": "log",
        "category": record.name,
        "message": record.getMessage(),
        "data": {"delivery_id": "d-1", "letter": BODY},
    }

    scrubbed = telemetry.scrub_breadcrumb(crumb, {"log_record": record})

    assert scrubbed is not None
    assert scrubbed["message"] == (
        "send via outbox failed: ValueError: [withheld] (hook https://h.example.com/…)"
    )
    assert scrubbed["data"] == {"delivery_id": "d-1"}
    event = {"logentry": {"message": record.msg, "params": record.args}, "extra": {"x": BODY}}
    out = json.dumps(telemetry.scrub_event(event, {"log_record": record}), default=str)
    assert SUBJECT not in out and BODY not in out and "SECRET" not in out


def test_init_sentry_without_a_dsn_does_nothing() -> None:
    from core.config import Settings

    assert telemetry.init_sentry(Settings(), component="test") is False
