"""Resend: POST /emails with an `Idempotency-Key`, so a retry with the same key never sends twice.

Resend remembers each key with a fingerprint of its body: the same key and body return the
first message's id, the same key with another body is refused (409), and a second request
while the first is still running is refused too (409). See docs/providers.md for the table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import httpx

from core.errors import (
    AmbiguousProviderError,
    PermanentProviderError,
    PossiblySentError,
    ProviderError,
)
from core.providers import http
from core.providers.base import Accepted, BatchResult, Email

NAME = "resend"
BATCH_LIMIT = 100
# Resend tag names and values allow only ASCII letters, digits, underscores and dashes.
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ResendProvider:
    """Sends through the Resend HTTP API."""

    name = NAME
    can_look_up = False
    batch_limit = BATCH_LIMIT
    replays_batches = True
    lookup_lags = False

    def __init__(
        self,
        client: httpx.Client,
        *,
        api_key: str,
        base_url: str = "https://api.resend.com",
        timeout: httpx.Timeout | None = None,
    ) -> None:
        self._client = client
        self._api_key = api_key
        self._url = base_url.rstrip("/") + "/emails"
        self._batch_url = self._url + "/batch"
        self._timeout = timeout or httpx.USE_CLIENT_DEFAULT

    def send(self, email: Email) -> Accepted:
        """POST the message with the delivery's idempotency key."""
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Idempotency-Key": email.idempotency_key,
        }
        return http.post_message(
            NAME,
            self._client,
            self._url,
            "id",
            _from_response,
            json=payload(email),
            headers=headers,
            timeout=self._timeout,
        )

    def find_sent(self, email: Email) -> Accepted | None:
        """Unsupported and unneeded: a retry with the same key returns the first message's id."""
        return None

    def batch_body(self, emails: Sequence[Email]) -> bytes:
        """Compact JSON with a fixed key order: a replay rebuilds it byte for byte."""
        return json.dumps(
            [payload(e) for e in emails], separators=(",", ":"), ensure_ascii=False
        ).encode()

    def send_batch(self, emails: Sequence[Email], key: str) -> BatchResult:
        """POST /emails/batch under one key, permissive: a bad message fails alone.

        A whole-call 5xx may follow a stored batch, so it is ambiguous here (repeat the same
        call with the same key), not transient as for one message sent with its own key.
        """
        if not 0 < len(emails) <= BATCH_LIMIT:
            raise ValueError(f"a Resend batch carries 1 to {BATCH_LIMIT} emails")
        headers = {
            "Authorization": f"Bearer {self._api_key}",
            "Idempotency-Key": key,
            "Content-Type": "application/json",
            "x-batch-validation": "permissive",
        }
        try:
            response = self._client.post(
                self._batch_url,
                content=self.batch_body(emails),
                headers=headers,
                timeout=self._timeout,
            )
            response.raise_for_status()
            body = response.json()
            ids = [str(item["id"]) for item in body.get("data") or []]
            errors = {
                int(e["index"]): str(e.get("message") or "") for e in body.get("errors") or []
            }
        except http.CALL_ERRORS as exc:
            raise http.batch_error(_translate(exc)) from exc
        return _batch_results(len(emails), ids, errors, response.status_code)


def payload(email: Email) -> dict[str, Any]:
    """The JSON body Resend expects."""
    body: dict[str, Any] = {
        "from": email.sender,
        "to": [email.to],
        "subject": email.subject,
        "text": email.text,
    }
    if email.tags:
        body["tags"] = [
            {"name": _TAG_UNSAFE.sub("_", name)[:256], "value": _TAG_UNSAFE.sub("_", value)[:256]}
            for name, value in email.tags.items()
        ]
    return body


def _translate(exc: Exception) -> ProviderError:
    """Every way a Resend call can fail, as one of our provider errors."""
    return http.translate(NAME, exc, _from_response)


def _batch_results(count: int, ids: list[str], errors: dict[int, str], status: int) -> BatchResult:
    """Permissive answers list the created ids in order, and the refused by index."""
    if len(ids) + len(errors) != count or any(not 0 <= i < count for i in errors):
        raise AmbiguousProviderError(
            NAME, f"batch answer does not match the request ({len(ids)} ids, {len(errors)} errors)"
        )
    created = iter(ids)
    results: BatchResult = []
    for index in range(count):
        if index in errors:
            results.append(
                PermanentProviderError(
                    NAME,
                    http.short(errors[index] or "refused"),
                    status_code=422,
                    error_code="validation_error",
                )
            )
        else:
            results.append(Accepted(NAME, next(created), status))
    return results


def _from_response(response: httpx.Response) -> ProviderError:
    status = response.status_code
    body = http.json_body(response)
    name = str(body.get("name") or "") or None
    message = http.short(str(body.get("message") or response.reason_phrase or status))
    fields: dict[str, Any] = {"status_code": status, "error_code": name}
    if status == 409 and name == "invalid_idempotent_request":
        return PossiblySentError(NAME, message, **fields)
    if status == 409:
        # concurrent_idempotent_requests: another request with this key is running right now
        # and may be accepted. Failing over would duplicate it; ask Resend again later.
        return AmbiguousProviderError(
            NAME, message, retry_after=http.retry_after(response), **fields
        )
    return http.status_error(NAME, response, message, **fields)
