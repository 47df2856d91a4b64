"""Postmark: POST /email. Postmark has no idempotency key, so the delivery's key travels in
`Metadata`, and after an ambiguous outcome `find_sent` searches outbound messages by it
before anything is sent again (DESIGN.md invariant 7). See docs/providers.md for the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from core.errors import (
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)
from core.providers import http
from core.providers.base import Accepted, BatchResult, Email

NAME = "postmark"
BATCH_LIMIT = 500
METADATA_KEY = "idempotency_key"
# Postmark ErrorCodes about the account or server, never about the letter: fail over.
# 10 bad token, 400/401 sender signature missing/unconfirmed, 405 not allowed to send
# (e.g. out of credits), 412 account pending approval.
ACCOUNT_ERROR_CODES = frozenset({10, 400, 401, 405, 412})
# Postmark limits metadata names to 20 characters and values to 80.
_META_NAME_MAX = 20
_META_VALUE_MAX = 80


class PostmarkProvider:
    """Sends through the Postmark HTTP API."""

    name = NAME
    can_look_up = True
    batch_limit = BATCH_LIMIT
    replays_batches = False  # no idempotency: each message is looked up by its metadata
    lookup_lags = True  # the outbound search shows a message some time after it was accepted

    def __init__(
        self,
        client: httpx.Client,
        *,
        server_token: str,
        base_url: str = "https://api.postmarkapp.com",
        message_stream: str = "outbound",
        timeout: httpx.Timeout | None = None,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._stream = message_stream
        self._headers = {"X-Postmark-Server-Token": server_token, "Accept": "application/json"}
        self._timeout = timeout or httpx.USE_CLIENT_DEFAULT

    def send(self, email: Email) -> Accepted:
        """POST the message with the idempotency key in its metadata."""
        return http.post_message(
            NAME,
            self._client,
            f"{self._base}/email",
            "MessageID",
            _from_response,
            json=payload(email, self._stream),
            headers=self._headers,
            timeout=self._timeout,
        )

    def batch_body(self, emails: Sequence[Email]) -> bytes:
        """The JSON array of messages, each carrying its delivery's key in Metadata."""
        return json.dumps(
            [payload(e, self._stream) for e in emails], separators=(",", ":"), ensure_ascii=False
        ).encode()

    def send_batch(self, emails: Sequence[Email], key: str) -> BatchResult:
        """POST /email/batch: HTTP 200 with one result per message (ErrorCode 0 = accepted).

        `key` names the batch for our records only: Postmark has no idempotency key, so an
        unknown outcome is settled message by message through `find_sent`.
        """
        if not 0 < len(emails) <= BATCH_LIMIT:
            raise ValueError(f"a Postmark batch carries 1 to {BATCH_LIMIT} messages")
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            response = self._client.post(
                f"{self._base}/email/batch",
                content=self.batch_body(emails),
                headers=headers,
                timeout=self._timeout,
            )
            response.raise_for_status()
            answers = response.json()
            if not isinstance(answers, list) or len(answers) != len(emails):
                raise ValueError(f"expected {len(emails)} results")
            return [_batch_result(a, response.status_code) for a in answers]
        except http.CALL_ERRORS as exc:
            raise http.batch_error(_translate(exc)) from exc

    def find_sent(self, email: Email) -> Accepted | None:
        """The outbound message carrying this idempotency key, if Postmark has one."""
        params = {"count": "1", "offset": "0", f"metadata_{METADATA_KEY}": email.idempotency_key}
        try:
            response = self._client.get(
                f"{self._base}/messages/outbound",
                params=params,
                headers=self._headers,
                timeout=self._timeout,
            )
            response.raise_for_status()
            body = response.json()
            if not body.get("TotalCount"):
                return None
            message_id = str(body["Messages"][0]["MessageID"])
        except (*http.CALL_ERRORS, IndexError) as exc:
            raise _translate(exc) from exc
        return Accepted(NAME, message_id, response.status_code)


def payload(email: Email, stream: str) -> dict[str, Any]:
    """The JSON body Postmark expects."""
    metadata = {
        name[:_META_NAME_MAX]: value[:_META_VALUE_MAX]
        for name, value in email.tags.items()
        if name != METADATA_KEY
    }
    metadata[METADATA_KEY] = email.idempotency_key
    body: dict[str, Any] = {
        "From": email.sender,
        "To": email.to,
        "Subject": email.subject,
        "TextBody": email.text,
        "MessageStream": stream,
        "Metadata": metadata,
    }
    if email.tags.get("kind"):
        body["Tag"] = email.tags["kind"]
    return body


def _translate(exc: Exception) -> ProviderError:
    """Every way a Postmark call can fail, as one of our provider errors."""
    return http.translate(NAME, exc, _from_response)


def _batch_result(answer: dict[str, Any], status: int) -> Accepted | ProviderError:
    """One message's answer inside a batch response."""
    code = int(answer.get("ErrorCode", -1))
    if code == 0:
        return Accepted(NAME, str(answer["MessageID"]), status)
    message = http.short(str(answer.get("Message") or f"ErrorCode {code}"))
    kind = TransientProviderError if code in ACCOUNT_ERROR_CODES else PermanentProviderError
    return kind(NAME, message, status_code=422, error_code=str(code))


def _from_response(response: httpx.Response) -> ProviderError:
    status = response.status_code
    body = http.json_body(response)
    code = body.get("ErrorCode")
    message = http.short(str(body.get("Message") or response.reason_phrase or status))
    fields: dict[str, Any] = {
        "status_code": status,
        "error_code": None if code is None else str(code),
    }
    return http.status_error(
        NAME, response, message, account_error=code in ACCOUNT_ERROR_CODES, **fields
    )
