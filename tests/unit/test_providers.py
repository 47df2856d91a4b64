"""Each provider's request shape and its error classification (docs/providers.md), with the
transport replaced: httpx.MockTransport for the HTTP APIs, a scripted SMTP object for SMTP."""

from __future__ import annotations

import email
import json
import smtplib
from collections.abc import Callable
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    PossiblySentError,
    ProviderError,
    TransientProviderError,
)
from core.providers.base import Accepted, Email
from core.providers.http import retry_after, timeout
from core.providers.outbox import OutboxProvider
from core.providers.postmark import PostmarkProvider
from core.providers.resend import ResendProvider
from core.providers.smtp import SmtpProvider
from tests.fakes.fixtures import make_email

Handler = Callable[[httpx.Request], httpx.Response]
BASE = "https://provider.test"


def client_for(handler: Handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def resend(handler: Handler, **kwargs: Any) -> ResendProvider:
    return ResendProvider(client_for(handler), api_key="re_key", base_url=BASE, **kwargs)


def postmark(handler: Handler, **kwargs: Any) -> PostmarkProvider:
    return PostmarkProvider(
        client_for(handler),
        server_token="pm-token",
        base_url=BASE,
        message_stream="letters",
        **kwargs,
    )


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, content=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("injected", request=request)

    return handler


def send_error(
    provider: ResendProvider | PostmarkProvider, mail: Email | None = None
) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        provider.send(mail or make_email())
    return caught.value


# ---------------------------------------------------------------- Resend


def test_resend_request_carries_key_auth_and_json_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "re-123"})

    mail = make_email(tags={"delivery_id": "d-1", "kind": "letter"})
    accepted = resend(handler).send(mail)

    assert accepted == Accepted("resend", "re-123", 200)
    request = seen[0]
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/emails")
    assert request.headers["Authorization"] == "Bearer re_key"
    assert request.headers["Idempotency-Key"] == mail.idempotency_key
    assert json.loads(request.content) == {
        "from": mail.sender,
        "to": [mail.to],
        "subject": mail.subject,
        "text": mail.text,
        "tags": [{"name": "delivery_id", "value": "d-1"}, {"name": "kind", "value": "letter"}],
    }


def test_resend_uses_the_configured_connect_and_read_timeouts() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "x"})

    resend(handler, timeout=timeout(connect=2.5, read=17)).send(make_email())

    assert seen[0].extensions["timeout"]["connect"] == 2.5
    assert seen[0].extensions["timeout"]["read"] == 17


def test_resend_tag_values_are_made_safe_for_resend() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"id": "x"})

    resend(handler).send(make_email(tags={"note": "a b/c"}))

    assert seen[0]["tags"] == [{"name": "note", "value": "a_b_c"}]


RESEND_ROWS = [
    # status, error name, headers, expected class, retry_after
    (409, "concurrent_idempotent_requests", {}, AmbiguousProviderError, None),
    (409, "invalid_idempotent_request", {}, PossiblySentError, None),
    (429, "rate_limit_exceeded", {"retry-after": "7"}, TransientProviderError, 7.0),
    (429, "daily_quota_exceeded", {}, TransientProviderError, None),
    (429, "monthly_quota_exceeded", {"retry-after": "3600"}, TransientProviderError, 3600.0),
    # A 5xx may follow a stored message: unknown, never failed over (DESIGN.md invariant 7).
    (500, "internal_server_error", {}, AmbiguousProviderError, None),
    (502, "application_error", {}, AmbiguousProviderError, None),
    (503, "application_error", {"retry-after": "2"}, AmbiguousProviderError, 2.0),
    (504, "gateway_timeout", {}, AmbiguousProviderError, None),
    (400, "validation_error", {}, PermanentProviderError, None),
    (401, "missing_api_key", {}, TransientProviderError, None),
    (403, "invalid_api_key", {}, TransientProviderError, None),
    (404, "not_found", {}, PermanentProviderError, None),
    (408, "timeout", {}, TransientProviderError, None),
    (422, "validation_error", {}, PermanentProviderError, None),
    (422, "invalid_from_address", {}, PermanentProviderError, None),
    (422, "missing_required_field", {}, PermanentProviderError, None),
    (413, "payload_too_large", {}, PermanentProviderError, None),
    (409, "some_other_conflict", {}, AmbiguousProviderError, None),
    (301, "moved", {}, TransientProviderError, None),
]


@pytest.mark.parametrize(("status", "name", "headers", "expected", "wait"), RESEND_ROWS)
def test_resend_classifies_error_responses(
    status: int,
    name: str,
    headers: dict[str, str],
    expected: type[ProviderError],
    wait: float | None,
) -> None:
    body = {"statusCode": status, "name": name, "message": "nope"}

    error = send_error(resend(answer(status, body, headers)))

    assert type(error) is expected
    assert (error.provider, error.status_code, error.error_code) == ("resend", status, name)
    assert error.retry_after == wait


TRANSPORT_ROWS = [
    (httpx.ConnectError, TransientProviderError),
    (httpx.ConnectTimeout, TransientProviderError),
    (httpx.PoolTimeout, TransientProviderError),
    (httpx.ReadTimeout, AmbiguousProviderError),
    (httpx.ReadError, AmbiguousProviderError),
    (httpx.RemoteProtocolError, AmbiguousProviderError),
    (httpx.WriteTimeout, AmbiguousProviderError),
    (httpx.WriteError, AmbiguousProviderError),
]


@pytest.mark.parametrize(("exc_type", "expected"), TRANSPORT_ROWS)
def test_resend_classifies_transport_errors(
    exc_type: type[httpx.TransportError], expected: type[ProviderError]
) -> None:
    error = send_error(resend(raising(exc_type)))

    assert type(error) is expected
    assert isinstance(error.__cause__, exc_type)  # raise ... from exc
    assert error.error_code == exc_type.__name__


@pytest.mark.parametrize("body", [{"ok": True}, b"<html>ok</html>", ["id"]])
def test_resend_success_without_an_id_is_ambiguous(body: Any) -> None:
    error = send_error(resend(answer(200, body)))

    assert type(error) is AmbiguousProviderError


def test_resend_find_sent_is_none_because_the_key_dedupes() -> None:
    assert resend(answer(500)).find_sent(make_email()) is None


# ---------------------------------------------------------------- Postmark


def test_postmark_request_carries_token_stream_and_key_in_metadata() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "To": "x",
                "SubmittedAt": "t",
                "MessageID": "pm-1",
                "ErrorCode": 0,
                "Message": "OK",
            },
        )

    mail = make_email(tags={"delivery_id": "d-1", "kind": "letter"})
    accepted = postmark(handler).send(mail)

    assert accepted == Accepted("postmark", "pm-1", 200)
    request = seen[0]
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/email")
    assert request.headers["X-Postmark-Server-Token"] == "pm-token"
    assert request.headers["Accept"] == "application/json"
    assert json.loads(request.content) == {
        "From": mail.sender,
        "To": mail.to,
        "Subject": mail.subject,
        "TextBody": mail.text,
        "MessageStream": "letters",
        "Metadata": {
            "delivery_id": "d-1",
            "kind": "letter",
            "idempotency_key": mail.idempotency_key,
        },
        "Tag": "letter",
    }


POSTMARK_ROWS = [
    # status, ErrorCode, headers, expected class, retry_after
    (422, 406, {}, PermanentProviderError, None),  # inactive recipient
    (422, 300, {}, PermanentProviderError, None),  # invalid email request
    (422, 1100, {}, PermanentProviderError, None),  # any other letter-level code
    (401, 10, {}, TransientProviderError, None),  # bad token: the account, not the letter
    (422, 10, {}, TransientProviderError, None),
    (422, 400, {}, TransientProviderError, None),  # sender signature not found
    (422, 401, {}, TransientProviderError, None),  # sender signature not confirmed
    (422, 405, {}, TransientProviderError, None),  # not allowed to send (credits)
    (422, 412, {}, TransientProviderError, None),  # account pending approval
    (429, 429, {"retry-after": "4"}, TransientProviderError, 4.0),
    (500, 0, {}, AmbiguousProviderError, None),
    (503, 0, {"retry-after": "9"}, AmbiguousProviderError, 9.0),
    (504, 0, {}, AmbiguousProviderError, None),
    (408, 0, {}, TransientProviderError, None),
    (302, 0, {}, TransientProviderError, None),
]


@pytest.mark.parametrize(("status", "code", "headers", "expected", "wait"), POSTMARK_ROWS)
def test_postmark_classifies_error_responses(
    status: int,
    code: int,
    headers: dict[str, str],
    expected: type[ProviderError],
    wait: float | None,
) -> None:
    error = send_error(postmark(answer(status, {"ErrorCode": code, "Message": "no"}, headers)))

    assert type(error) is expected
    assert (error.provider, error.status_code, error.error_code) == ("postmark", status, str(code))
    assert error.retry_after == wait


@pytest.mark.parametrize(("exc_type", "expected"), TRANSPORT_ROWS)
def test_postmark_classifies_transport_errors(
    exc_type: type[httpx.TransportError], expected: type[ProviderError]
) -> None:
    error = send_error(postmark(raising(exc_type)))

    assert type(error) is expected
    assert isinstance(error.__cause__, exc_type)


def test_postmark_success_without_a_message_id_is_ambiguous() -> None:
    error = send_error(postmark(answer(200, {"ErrorCode": 0})))

    assert type(error) is AmbiguousProviderError


def test_postmark_find_sent_searches_outbound_by_the_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"TotalCount": 1, "Messages": [{"MessageID": "pm-9"}]})

    mail = make_email()
    found = postmark(handler).find_sent(mail)

    assert found == Accepted("postmark", "pm-9", 200)
    request = seen[0]
    assert (request.method, request.url.path) == ("GET", "/messages/outbound")
    assert dict(request.url.params) == {
        "count": "1",
        "offset": "0",
        "metadata_idempotency_key": mail.idempotency_key,
    }
    assert request.headers["X-Postmark-Server-Token"] == "pm-token"


def test_postmark_find_sent_is_none_when_nothing_matches() -> None:
    found = postmark(answer(200, {"TotalCount": 0, "Messages": []})).find_sent(make_email())

    assert found is None


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (answer(503, {"ErrorCode": 0, "Message": "down"}), AmbiguousProviderError),
        (raising(httpx.ConnectError), TransientProviderError),
        (raising(httpx.ReadTimeout), AmbiguousProviderError),
    ],
)
def test_postmark_find_sent_raises_when_it_cannot_tell(
    handler: Handler, expected: type[ProviderError]
) -> None:
    with pytest.raises(expected):
        postmark(handler).find_sent(make_email())


# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "-3"}, 0.0),
        (
            {
                "retry-after": "Wed, 01 Jan 2030 12:00:30 GMT",
                "date": "Wed, 01 Jan 2030 12:00:00 GMT",
            },
            30.0,
        ),
        ({"retry-after": "Wed, 01 Jan 2030 12:00:30 GMT"}, None),  # no Date to measure from
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_or_a_date_against_the_response_date(
    headers: dict[str, str], expected: float | None
) -> None:
    assert retry_after(httpx.Response(429, headers=headers)) == expected


# ---------------------------------------------------------------- SMTP


class FakeSocket:
    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def settimeout(self, value: float) -> None:
        self.timeouts.append(value)


class ScriptedSMTP:
    """Stands in for smtplib.SMTP: replies and raises where the test says."""

    def __init__(
        self, replies: dict[str, Any] | None = None, raises: dict[str, BaseException] | None = None
    ):
        self.replies = replies or {}
        self.raises = raises or {}
        self.commands: list[tuple[str, Any]] = []
        self.sock: FakeSocket | None = None
        self.data_sent: bytes | None = None

    def _step(self, name: str, arg: Any = None) -> tuple[int, bytes]:
        self.commands.append((name, arg))
        if name in self.raises:
            raise self.raises[name]
        reply: tuple[int, bytes] = self.replies.get(name, (250, b"OK"))
        return reply

    def connect(self, host: str, port: int) -> tuple[int, bytes]:
        self.sock = FakeSocket()
        return self._step("connect", (host, port))

    def ehlo_or_helo_if_needed(self) -> None:
        self._step("ehlo")

    def ehlo(self) -> None:
        self._step("ehlo")

    def starttls(self, context: Any = None) -> None:
        self._step("starttls")

    def login(self, user: str, password: str) -> None:
        self._step("login", (user, password))

    def mail(self, sender: str) -> tuple[int, bytes]:
        return self._step("mail", sender)

    def rcpt(self, to: str) -> tuple[int, bytes]:
        return self._step("rcpt", to)

    def data(self, message: bytes) -> tuple[int, bytes]:
        self.data_sent = message
        return self._step("data")

    def quit(self) -> None:
        self.commands.append(("quit", None))

    def close(self) -> None:
        self.commands.append(("close", None))


def smtp_with(fake: ScriptedSMTP, **kwargs: Any) -> SmtpProvider:
    return SmtpProvider("mail.test", 2525, read_timeout=13, smtp_factory=lambda: fake, **kwargs)  # type: ignore[arg-type, return-value]


def test_smtp_sends_envelope_and_a_message_id_derived_from_the_key() -> None:
    fake = ScriptedSMTP()
    mail = make_email(text="Dear future me,\nça va ?\n")

    accepted = smtp_with(fake, username="u", password="p", starttls=True).send(mail)

    assert accepted == Accepted("smtp", f"<{mail.idempotency_key}@capsule>", 250)
    steps = [name for name, _ in fake.commands]
    assert steps == ["connect", "ehlo", "starttls", "ehlo", "login", "mail", "rcpt", "data", "quit"]
    assert ("mail", "letters@capsule.localhost") in fake.commands
    assert ("rcpt", mail.to) in fake.commands
    assert fake.sock is not None and fake.sock.timeouts == [13]
    assert fake.data_sent is not None
    sent = email.message_from_bytes(fake.data_sent, policy=default_policy)
    assert sent["Message-ID"] == f"<{mail.idempotency_key}@capsule>"
    assert (sent["From"], sent["To"], sent["Subject"]) == (mail.sender, mail.to, mail.subject)
    assert sent.get_content().replace("\r\n", "\n") == mail.text  # type: ignore[attr-defined]
    assert max(fake.data_sent) < 128  # 7-bit clean: any relay takes it


SMTP_ROWS = [
    # where, replies, raises, expected class
    ("refused", {}, {"connect": ConnectionRefusedError(111, "refused")}, TransientProviderError),
    ("connect timeout", {}, {"connect": TimeoutError("timed out")}, TransientProviderError),
    (
        "bad greeting",
        {},
        {"connect": smtplib.SMTPConnectError(554, b"go away")},
        TransientProviderError,
    ),
    (
        "hang-up before DATA",
        {},
        {"ehlo": smtplib.SMTPServerDisconnected("gone")},
        TransientProviderError,
    ),
    (
        "auth failed",
        {},
        {"login": smtplib.SMTPAuthenticationError(535, b"bad")},
        TransientProviderError,
    ),
    ("sender refused 5xx", {"mail": (553, b"relay denied")}, {}, TransientProviderError),
    ("sender 4xx", {"mail": (451, b"later")}, {}, TransientProviderError),
    ("recipient 550", {"rcpt": (550, b"5.1.1 no such user")}, {}, PermanentProviderError),
    ("recipient 451", {"rcpt": (451, b"4.7.1 greylisted")}, {}, TransientProviderError),
    (
        "hang-up at RCPT",
        {},
        {"rcpt": smtplib.SMTPServerDisconnected("gone")},
        TransientProviderError,
    ),
    ("DATA refused 554", {}, {"data": smtplib.SMTPDataError(554, b"no")}, PermanentProviderError),
    (
        "DATA refused 451",
        {},
        {"data": smtplib.SMTPDataError(451, b"later")},
        TransientProviderError,
    ),
    ("body rejected 554", {"data": (554, b"5.7.1 spam")}, {}, PermanentProviderError),
    ("body deferred 452", {"data": (452, b"4.3.1 full")}, {}, TransientProviderError),
    (
        "hang-up during DATA",
        {},
        {"data": smtplib.SMTPServerDisconnected("gone")},
        AmbiguousProviderError,
    ),
    ("timeout during DATA", {}, {"data": TimeoutError("timed out")}, AmbiguousProviderError),
]


@pytest.mark.parametrize(
    ("where", "replies", "raises", "expected"), SMTP_ROWS, ids=[row[0] for row in SMTP_ROWS]
)
def test_smtp_classifies_failures_by_reply_and_phase(
    where: str,
    replies: dict[str, Any],
    raises: dict[str, BaseException],
    expected: type[ProviderError],
) -> None:
    fake = ScriptedSMTP(replies, raises)

    with pytest.raises(ProviderError) as caught:
        smtp_with(fake, username="user", password="secret").send(make_email())

    assert type(caught.value) is expected
    assert caught.value.provider == "smtp"
    assert ("quit", None) not in fake.commands  # a failed conversation is just closed


def test_smtp_find_sent_is_none() -> None:
    assert smtp_with(ScriptedSMTP()).find_sent(make_email()) is None


# ---------------------------------------------------------------- outbox


def test_outbox_writes_one_eml_per_key_with_the_message_id(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path / "outbox")
    mail = make_email()

    accepted = outbox.send(mail)

    path = tmp_path / "outbox" / f"{mail.idempotency_key}.eml"
    assert accepted == Accepted("outbox", f"<{mail.idempotency_key}@capsule>")
    written = email.message_from_bytes(path.read_bytes(), policy=default_policy)
    assert written["Message-ID"] == f"<{mail.idempotency_key}@capsule>"
    assert written["To"] == mail.to
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == [path.name]  # no temp file left


def test_outbox_is_idempotent_and_never_rewrites(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path)
    mail = make_email(subject="first")
    first = outbox.send(mail)
    before = outbox.path_for(mail.idempotency_key).read_bytes()

    second = outbox.send(make_email(idempotency_key=mail.idempotency_key, subject="second"))

    assert second == first
    assert outbox.path_for(mail.idempotency_key).read_bytes() == before
    assert outbox.find_sent(mail) == first


def test_outbox_find_sent_is_none_before_sending(tmp_path: Path) -> None:
    assert OutboxProvider(tmp_path).find_sent(make_email()) is None


def test_outbox_hashes_keys_that_are_unsafe_file_names(tmp_path: Path) -> None:
    outbox = OutboxProvider(tmp_path / "box")

    outbox.send(make_email(idempotency_key="../../escape"))

    (written,) = (tmp_path / "box").iterdir()
    assert written.name.startswith("sha256-")


def test_outbox_io_error_is_transient(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the outbox directory should be")

    with pytest.raises(TransientProviderError) as caught:
        OutboxProvider(blocker / "outbox").send(make_email())

    assert isinstance(caught.value.__cause__, OSError)
