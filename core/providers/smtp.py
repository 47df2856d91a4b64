"""SMTP: one connection per message (or per batch), with a Message-ID derived from the
idempotency key.

SMTP has no idempotency, but the Message-ID `<{key}@capsule>` is the same on every attempt, so
a receiver (or a human) can recognise a repeat. Whether a failure is safe to fail over depends
on when it happened: before DATA nothing can have been accepted; a timeout or a hang-up once
the message body is on the wire may hide an accepted message. A definite reply code decides
whenever there is one: 4xx try later (or elsewhere), 5xx never.

A batch is many mail transactions on one connection; each message gets its own answer. When
the connection breaks mid-batch, the message on the wire is ambiguous and the rest were not
sent (transient).
"""

from __future__ import annotations

import contextlib
import smtplib
import ssl
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.errors import MessageError
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr

from core.errors import (
    AmbiguousProviderError,
    MessageBuildError,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from core.providers.base import Accepted, BatchResult, Email
from core.providers.http import short

NAME = "smtp"
BATCH_LIMIT = 100  # messages per connection; many servers cap transactions per session
# 7-bit output (quoted-printable bodies) goes through any relay, with or without 8BITMIME.
_POLICY = SMTP_POLICY.clone(cte_type="7bit")
# Replies that concern our own account or server, not the letter: fail over rather than give up.
_NOT_ABOUT_THE_LETTER = (
    smtplib.SMTPAuthenticationError,
    smtplib.SMTPSenderRefused,
    smtplib.SMTPHeloError,
    smtplib.SMTPConnectError,
)


def message_id_for(idempotency_key: str) -> str:
    """The Message-ID every attempt of this delivery carries."""
    return f"<{idempotency_key}@capsule>"


def build_message(email: Email, *, date: datetime | None = None) -> EmailMessage:
    """The RFC 5322 message for SMTP and the file outbox."""
    message = EmailMessage(policy=_POLICY)
    message["From"] = email.sender
    message["To"] = email.to
    message["Subject"] = email.subject
    message["Message-ID"] = message_id_for(email.idempotency_key)
    message["Date"] = format_datetime(date or datetime.now(UTC))
    message.set_content(email.text)
    return message


# What building a message raises when the letter, not the code, is at fault: a header with a
# line break, text that cannot be encoded.
BUILD_ERRORS = (ValueError, TypeError, LookupError, MessageError)


def message_bytes(email: Email, provider: str = NAME, *, date: datetime | None = None) -> bytes:
    """The message on the wire, built before any connection: a letter that cannot be an email
    is a MessageBuildError (permanent; nothing was sent), never an ambiguous outcome."""
    try:
        return build_message(email, date=date).as_bytes()
    except BUILD_ERRORS as exc:
        raise MessageBuildError(provider, exc) from exc


class _Progress:
    """How far a conversation got: decides whether a hang-up may hide an accepted message."""

    data_started = False


class SmtpProvider:
    """Sends over SMTP (optionally STARTTLS and AUTH), one connection per message."""

    name = NAME
    can_look_up = False
    lookup_lags = False
    batch_limit = BATCH_LIMIT
    replays_batches = False

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        connect_timeout: float = 5,
        read_timeout: float = 20,
        smtp_factory: Callable[[], smtplib.SMTP] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._starttls = starttls
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._factory = smtp_factory or (lambda: smtplib.SMTP(timeout=connect_timeout))

    def send(self, email: Email) -> Accepted:
        """Deliver the message to the configured server."""
        data = message_bytes(email)
        progress = _Progress()
        try:
            code = self._deliver(email, data, progress)
        except (smtplib.SMTPException, OSError) as exc:
            raise _translate(exc, data_started=progress.data_started) from exc
        return Accepted(NAME, message_id_for(email.idempotency_key), code)

    def find_sent(self, email: Email) -> Accepted | None:
        """SMTP cannot be asked what it received."""
        return None

    def batch_body(self, emails: Sequence[Email]) -> bytes:
        """SMTP has no batch request; the Message-IDs stand for it."""
        return "\n".join(message_id_for(e.idempotency_key) for e in emails).encode()

    def send_batch(self, emails: Sequence[Email], key: str) -> BatchResult:
        """One connection, one mail transaction per message, one answer per message."""
        results: BatchResult = []
        built: list[tuple[Email, bytes]] = []
        for email in emails:
            try:
                built.append((email, message_bytes(email)))
            except ProviderError as exc:
                results.append(exc)  # permanent, before any connection; placed below
        smtp = self._factory()
        try:
            smtp.connect(self._host, self._port)
            if smtp.sock is not None:
                smtp.sock.settimeout(self._read_timeout)
            self._hello(smtp)
        except (smtplib.SMTPException, OSError) as exc:
            smtp.close()
            raise _translate(exc, data_started=False) from exc
        answers: dict[int, Accepted | ProviderError] = {}
        broken: ProviderError | None = None
        progress = _Progress()
        for email, data in built:
            if broken is not None:
                answers[id(email)] = TransientProviderError(
                    NAME, f"not sent: the connection broke ({broken})"
                )
                continue
            progress.data_started = False
            try:
                code = self._transaction(smtp, email, data, progress)
            except (smtplib.SMTPException, OSError) as exc:
                error = _translate(exc, data_started=progress.data_started)
                answers[id(email)] = error
                if _reply(exc)[0] is None:
                    broken = error  # no reply: the connection is gone
                else:
                    _reset(smtp)
                continue
            answers[id(email)] = Accepted(NAME, message_id_for(email.idempotency_key), code)
        if broken is None:
            _quit(smtp)
        else:
            smtp.close()
        unbuilt = iter(results)
        return [answers[id(e)] if id(e) in answers else next(unbuilt) for e in emails]

    def _deliver(self, email: Email, data: bytes, progress: _Progress) -> int:
        smtp = self._factory()
        try:
            code = self._converse(smtp, email, data, progress)
        except BaseException:
            smtp.close()  # no QUIT: after a timeout it would only wait for another one
            raise
        _quit(smtp)
        return code

    def _converse(self, smtp: smtplib.SMTP, email: Email, data: bytes, progress: _Progress) -> int:
        smtp.connect(self._host, self._port)
        if smtp.sock is not None:
            smtp.sock.settimeout(self._read_timeout)
        self._hello(smtp)
        return self._transaction(smtp, email, data, progress)

    def _transaction(
        self, smtp: smtplib.SMTP, email: Email, data: bytes, progress: _Progress
    ) -> int:
        sender = parseaddr(email.sender)[1] or email.sender
        code, reply = smtp.mail(sender)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, sender)
        code, reply = smtp.rcpt(email.to)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({email.to: (code, reply)})
        progress.data_started = True
        code, reply = smtp.data(data)
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
        return code

    def _hello(self, smtp: smtplib.SMTP) -> None:
        smtp.ehlo_or_helo_if_needed()
        if self._starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if self._username:
            smtp.login(self._username, self._password or "")


def _reset(smtp: smtplib.SMTP) -> None:
    """RSET after a refused message so the next transaction starts clean."""
    with contextlib.suppress(smtplib.SMTPException, OSError):
        smtp.rset()


def _quit(smtp: smtplib.SMTP) -> None:
    """End politely; the message is already accepted, so a failing QUIT changes nothing."""
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def _translate(exc: BaseException, *, data_started: bool) -> ProviderError:
    """Every way an SMTP conversation can fail, as one of our provider errors."""
    code, detail = _reply(exc)
    kind: type[ProviderError]
    if code is None:
        # No reply: a hang-up or timeout once the body was on the wire may hide an acceptance.
        kind = AmbiguousProviderError if data_started else TransientProviderError
    elif code < 500 or isinstance(exc, _NOT_ABOUT_THE_LETTER):
        kind = TransientProviderError
    else:
        kind = PermanentProviderError
    return kind(NAME, short(detail), status_code=code, error_code=type(exc).__name__)


def _reply(exc: BaseException) -> tuple[int | None, str]:
    """The server's reply code and text, when the failure was a reply."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code, text = next(iter(exc.recipients.values()))
        return code, f"{code} {_text(text)}"
    if isinstance(exc, smtplib.SMTPResponseException) and exc.smtp_code > 0:
        return exc.smtp_code, f"{exc.smtp_code} {_text(exc.smtp_error)}"
    return None, f"{type(exc).__name__}: {exc}"


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
