"""What the HTTP providers share: which transport errors mean "not sent", and Retry-After.

Transport errors split on one question: could the provider have received the whole request?

    httpx.TransportError
    ├── not sent (transient): ConnectError, ConnectTimeout, PoolTimeout, ProxyError,
    │                         UnsupportedProtocol, LocalProtocolError
    └── maybe sent (ambiguous): ReadTimeout, ReadError, RemoteProtocolError, WriteTimeout,
                                WriteError, CloseError and anything unknown
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from core.errors import (
    AmbiguousProviderError,
    MessageBuildError,
    PermanentProviderError,
    PossiblySentError,
    ProviderError,
    TransientProviderError,
)
from core.providers.base import Accepted

# Raised before a single byte of the request could have reached the provider.
NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)
MESSAGE_LIMIT = 200
# What a call, or reading its answer, may raise: `translate` makes each one a provider error.
CALL_ERRORS = (httpx.HTTPError, httpx.InvalidURL, ValueError, KeyError, TypeError)


def timeout(connect: float, read: float) -> httpx.Timeout:
    """Connect and read timeouts kept apart: a slow connect is safe to fail over, a slow read is not."""
    return httpx.Timeout(read, connect=connect, pool=connect)


def transport_error(provider: str, exc: httpx.TransportError) -> ProviderError:
    """Classify a transport failure by whether the request may have reached the provider."""
    detail = short(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, NOT_SENT):
        return TransientProviderError(provider, detail, error_code=type(exc).__name__)
    return AmbiguousProviderError(provider, detail, error_code=type(exc).__name__)


def build_request(
    provider: str, client: httpx.Client, method: str, url: str, **options: Any
) -> httpx.Request:
    """The request, built before anything is sent: a letter that cannot be put into one (text
    JSON cannot encode, a header value httpx refuses) is a MessageBuildError, never ambiguous."""
    try:
        return client.build_request(method, url, **options)
    except httpx.InvalidURL as exc:  # the configured base URL, not the letter
        raise TransientProviderError(
            provider, f"invalid URL: {exc}", error_code="invalid_url"
        ) from exc
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise MessageBuildError(provider, exc) from exc


def post_message(
    provider: str,
    client: httpx.Client,
    url: str,
    id_field: str,
    from_response: Callable[[httpx.Response], ProviderError],
    **options: Any,
) -> Accepted:
    """POST one message and read its id from the answer's `id_field`; any failure on the way
    is raised as the provider error it means (`translate`)."""
    request = build_request(provider, client, "POST", url, **options)
    try:
        response = client.send(request)
        response.raise_for_status()
        message_id = str(response.json()[id_field])
    except CALL_ERRORS as exc:
        raise translate(provider, exc, from_response) from exc
    return Accepted(provider, message_id, response.status_code)


def batch_error(error: ProviderError) -> ProviderError:
    """A batch call's failure: as for one message (a 5xx may hide a stored batch), except that
    a refusal of the whole call (a malformed batch) stored nothing and blames no single letter:
    transient, so each letter is retried and fails only after its attempts."""
    if isinstance(error, PermanentProviderError) and not isinstance(error, PossiblySentError):
        return TransientProviderError(
            error.provider,
            str(error).removeprefix(f"{error.provider}: "),
            status_code=error.status_code,
            error_code=error.error_code,
        )
    return error


def translate(
    provider: str, exc: Exception, from_response: Callable[[httpx.Response], ProviderError]
) -> ProviderError:
    """Every way an HTTP provider call can fail, as one of our provider errors."""
    if isinstance(exc, httpx.HTTPStatusError):
        return from_response(exc.response)
    if isinstance(exc, httpx.TransportError):
        return transport_error(provider, exc)
    if isinstance(exc, httpx.InvalidURL):
        return TransientProviderError(provider, f"invalid URL: {exc}", error_code="invalid_url")
    # A success status whose body carries no message id: it may well have been sent.
    return AmbiguousProviderError(provider, short(f"unreadable success answer: {exc!r}"))


def status_error(
    provider: str,
    response: httpx.Response,
    message: str,
    *,
    account_error: bool = False,
    **fields: Any,
) -> ProviderError:
    """An error status the provider gives no meaning of its own, by its class.

    429, and an account problem (401, 403, 408, or `account_error`: the operator's, not the
    letter's): a definite refusal, fail over. A 5xx answers a request the provider received
    whole: it may have stored the message before failing (a gateway timeout, a crash after the
    write). Unknown, never a reason to fail over: the letter stays with this provider
    (DESIGN.md invariant 7). Any other 4xx refuses this letter for good.
    """
    status = response.status_code
    if status == 429:
        return TransientProviderError(
            provider, message, retry_after=retry_after(response), **fields
        )
    if status in (401, 403, 408) or account_error:
        return TransientProviderError(provider, message, **fields)
    if status >= 500:
        return AmbiguousProviderError(
            provider, message, retry_after=retry_after(response), **fields
        )
    if 300 <= status < 400:
        return TransientProviderError(provider, message, **fields)
    if 400 <= status < 500:
        return PermanentProviderError(provider, message, **fields)
    return AmbiguousProviderError(provider, message, **fields)


def retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds, or an HTTP date read against the
    response's own Date header so that no local clock is involved), else from the IETF
    `ratelimit-reset` header (seconds until the quota window resets, sent by Resend);
    None when both are absent."""
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return _ratelimit_reset(response)
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    when = _http_date(raw)
    sent = _http_date(response.headers.get("date", ""))
    if when is None or sent is None:
        return None
    return max(0.0, (when - sent).total_seconds())


def _ratelimit_reset(response: httpx.Response) -> float | None:
    raw = response.headers.get("ratelimit-reset", "").strip()
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None


def _http_date(raw: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else None


def json_body(response: httpx.Response) -> dict[str, Any]:
    """The response body as a JSON object, or {} when it is not one."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def short(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """One line, at most `limit` characters: attempt rows stay small and readable."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
