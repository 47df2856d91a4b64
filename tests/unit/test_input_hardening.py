"""Bad input refused at the door, and a letter that cannot become a message failing for good
(never ambiguous) before anything reaches a provider."""

from __future__ import annotations

import smtplib
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from core.db import SessionFactory
from core.errors import InvalidDeliveryTime, MessageBuildError, ValidationError
from core.models import ErrorClass
from core.policy import parse_when
from core.providers.chain import ProviderChain
from core.providers.circuit import CircuitBreaker
from core.providers.outbox import OutboxProvider
from core.providers.postmark import PostmarkProvider
from core.providers.resend import ResendProvider
from core.providers.smtp import SmtpProvider
from core.validation import validate_letter
from tests.fakes.fixtures import make_email

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LIMIT = 256 * 1024

# ---------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    "char",
    [
        "\r",
        "\n",
        "\x0b",  # VT
        "\x0c",  # FF
        "\x85",  # NEL
        "\u2028",  # LINE SEPARATOR
        "\u2029",  # PARAGRAPH SEPARATOR
        "\x00",
        "\x1b",  # ESC
        "\x7f",  # DEL
        "\t",  # a subject is one line of plain text: TAB is refused too
        "\u202e",  # RIGHT-TO-LEFT OVERRIDE (spoofing)
        "\u200b",  # ZERO WIDTH SPACE
        "\ufeff",  # BOM
        "\udcff",  # a byte that was not UTF-8
    ],
)
def test_a_subject_with_a_control_or_invisible_character_is_refused(char: str) -> None:
    subject = f"Secret plans{char}Bcc: everyone@example.com"

    with pytest.raises(ValidationError) as refused:
        validate_letter(subject, "Dear future me", LIMIT)

    assert refused.value.field == "subject"
    assert f"U+{ord(char):04X}" in str(refused.value)
    assert "Secret" not in str(refused.value)  # the message never quotes the letter


@pytest.mark.parametrize(
    "subject",
    [
        "Für dich, in zehn Jahren",
        "To the family 👨\u200d👩\u200d👧",  # emoji joined by ZWJ
        "می\u200cخواهم",  # Persian needs ZWNJ
        "Scotland 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f",  # tag flag
    ],
)
def test_ordinary_subjects_in_any_script_pass(subject: str) -> None:
    validate_letter(subject, "Dear future me,\n\tindented line\r\n", LIMIT)


def test_a_body_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        validate_letter("Hi", "Dear future me \udcff", LIMIT)
    assert refused.value.field == "body" and "not UTF-8" in str(refused.value)


# ---------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("+99999999999d", "too far ahead"),
        ("+9999999w", "too far ahead"),
        ("+" + "9" * 5000 + "s", "too far ahead"),  # longer than int() reads
        ("9999-12-31T23:59:59-01:00", "outside the years 1 to 9999"),
        ("0001-01-01T00:00:00+01:00", "outside the years 1 to 9999"),
        ("x" * 5000, "cannot read"),
    ],
)
def test_unreadable_or_overflowing_times_are_invalid_delivery_times(
    text: str, message: str
) -> None:
    with pytest.raises(InvalidDeliveryTime) as refused:
        parse_when(text, NOW)
    assert message in str(refused.value) and len(str(refused.value)) < 200


# ---------------------------------------------------------------- messages that cannot be built

UNBUILDABLE_SUBJECTS = ["Hi\nBcc: everyone@example.com", "Hi\rthere", "Hi\u2028there"]


def _no_connection() -> smtplib.SMTP:
    raise AssertionError("a message that cannot be built must not open a connection")


@pytest.mark.parametrize("subject", UNBUILDABLE_SUBJECTS)
def test_smtp_refuses_to_build_before_connecting(subject: str) -> None:
    connections: list[int] = []

    def factory() -> smtplib.SMTP:
        connections.append(1)
        return _no_connection()

    provider = SmtpProvider("mail.test", 2525, smtp_factory=factory)

    with pytest.raises(MessageBuildError) as failed:
        provider.send(make_email(subject=subject))

    assert connections == []
    assert failed.value.error_class == ErrorClass.PERMANENT
    assert "Bcc" not in str(failed.value) and "Hi" not in str(failed.value)


@pytest.mark.parametrize("subject", UNBUILDABLE_SUBJECTS)
def test_outbox_refuses_to_build_and_writes_nothing(subject: str, tmp_path: Path) -> None:
    provider = OutboxProvider(tmp_path / "outbox")

    with pytest.raises(MessageBuildError):
        provider.send(make_email(subject=subject))

    assert not (tmp_path / "outbox").exists() or list((tmp_path / "outbox").iterdir()) == []


@pytest.mark.parametrize("kind", ["resend", "postmark"])
@pytest.mark.parametrize(
    "overrides",
    [
        {"text": "Dear future me \udcff"},  # JSON cannot encode a lone surrogate as UTF-8
        {"idempotency_key": "ключ"},  # a header value httpx refuses
    ],
)
def test_http_providers_refuse_a_request_they_cannot_build(
    kind: str, overrides: dict[str, str]
) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"id": "x", "MessageID": "x"})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    provider: ResendProvider | PostmarkProvider
    if kind == "resend":
        provider = ResendProvider(client, api_key="k", base_url="https://p.test")
    else:
        provider = PostmarkProvider(client, server_token="t", base_url="https://p.test")
    email = make_email(**overrides)
    if "idempotency_key" in overrides and kind == "postmark":
        # Postmark carries the key in the JSON body, where any text is fine: it is sent.
        assert provider.send(email).message_id == "x" and len(requests) == 1
        return

    with pytest.raises(MessageBuildError) as failed:
        provider.send(email)

    assert requests == []
    assert failed.value.error_class == ErrorClass.PERMANENT and failed.value.provider == kind


def test_invalid_base_url_stays_a_configuration_problem_not_the_letters() -> None:
    client = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)))
    provider = ResendProvider(client, api_key="k", base_url="https://p.test:x")

    with pytest.raises(Exception) as failed:
        provider.send(make_email())

    assert not isinstance(failed.value, MessageBuildError)
    assert getattr(failed.value, "error_class", None) == ErrorClass.TRANSIENT


class _Unbuildable:
    name = "smtp"
    can_look_up = False

    def send(self, email):  # type: ignore[no-untyped-def]
        raise MessageBuildError("smtp", ValueError("header"))

    def find_sent(self, email):  # type: ignore[no-untyped-def]
        return None


class _Spare:
    name = "spare"
    can_look_up = False
    sent = 0

    def send(self, email):  # type: ignore[no-untyped-def]
        self.sent += 1
        raise AssertionError("a permanent failure must not fail over")

    def find_sent(self, email):  # type: ignore[no-untyped-def]
        return None


def test_chain_fails_an_unbuildable_message_for_good_without_touching_the_circuit(
    circuit_sessions: SessionFactory,
) -> None:
    breaker = CircuitBreaker(circuit_sessions, threshold=3, reset_seconds=60)
    breaker.record_failure("smtp", now=NOW, message="connection refused")
    spare = _Spare()
    chain = ProviderChain([_Unbuildable(), spare], breaker=breaker)

    outcome = chain.send(make_email(), now=NOW, clock=lambda: NOW)

    assert outcome.error_class == ErrorClass.PERMANENT and outcome.pinned_provider is None
    assert "could not be built" in (outcome.error or "") and spare.sent == 0
    # Nothing reached the provider: its earlier failure is neither cleared nor added to.
    assert breaker.state("smtp", now=NOW).consecutive_failures == 1
