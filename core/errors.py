"""Every error the domain raises, in one place.

    CapsuleError
    ├── ConfigError                 a CAPSULE_* variable is missing or malformed (variable)
    ├── ValidationError             bad input from a user or operator (field)
    │   ├── InvalidAddress
    │   ├── InvalidDeliveryTime
    │   ├── LetterTooLarge
    │   ├── WebhookPayloadError     a verified webhook whose body we cannot read
    │   └── BulkConflict            an active bulk operation covers the same rows (operation_id)
    ├── InsufficientCredit          the owner has no credit left (user_id)
    ├── NotFound                    (entity, key)
    │   ├── DeliveryNotFound        (delivery_id)
    │   └── UserNotFound
    ├── InvalidTransition           the row is not in a state that allows it (delivery_id, status, action)
    ├── PermissionDenied            the actor's role may not do this (actor, action)
    ├── CryptoError
    │   ├── UnknownKeyId            (key_id)
    │   └── DecryptionFailed        wrong key or tampered ciphertext (letter_id)
    ├── EnqueueError                the broker did not take the task (delivery_id)
    └── ProviderError               (provider, status_code, error_code, retry_after)
        ├── TransientProviderError  definitely not accepted; may work later or elsewhere
        ├── AmbiguousProviderError  may have been accepted; retry the same provider, same key
        └── PermanentProviderError  will never be accepted; do not retry
            ├── PossiblySentError   the provider hints it already has this message
            └── MessageBuildError   the letter cannot be made into a message; nothing was sent

Each class carries the fields that let a caller act on it without parsing the message.
"""

from __future__ import annotations

import uuid


def quoted(key: object) -> str:
    """An id as it appears in a message: quoted, control characters escaped, so an id typed
    with a stray space or newline is visible and a message stays one line."""
    return repr(str(key))


class CapsuleError(Exception):
    """Base of every error raised by the domain."""


class ConfigError(CapsuleError):
    """A setting is missing or malformed."""

    def __init__(self, variable: str, message: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {message}")


class ValidationError(CapsuleError):
    """Input that can never be accepted as given."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


class InvalidAddress(ValidationError):
    """The recipient or account address is not a usable email address."""


class InvalidDeliveryTime(ValidationError):
    """The delivery time is in the past, too far ahead, or unreadable."""


class LetterTooLarge(ValidationError):
    """The letter exceeds the configured size limit."""


class WebhookPayloadError(ValidationError):
    """A provider's webhook body lacks what an event needs (type, message id, event id)."""

    def __init__(self, message: str) -> None:
        super().__init__("payload", message)


class BulkConflict(ValidationError):
    """A bulk operation still active could touch rows the new one would: one at a time."""

    def __init__(self, operation_id: int, message: str) -> None:
        self.operation_id = operation_id
        super().__init__("filter", message)


class InsufficientCredit(CapsuleError):
    """The owner has no credit to reserve for a new delivery."""

    def __init__(self, user_id: int, balance: int) -> None:
        self.user_id = user_id
        self.balance = balance
        super().__init__(f"user {user_id} has no delivery credit left (balance {balance})")


class NotFound(CapsuleError):
    """The referenced row does not exist."""

    def __init__(self, entity: str, key: object) -> None:
        self.entity = entity
        self.key = key
        super().__init__(f"{entity} {quoted(key)} not found")


class DeliveryNotFound(NotFound):
    """No delivery has this id."""

    def __init__(self, delivery_id: uuid.UUID | str) -> None:
        self.delivery_id = delivery_id
        super().__init__("delivery", delivery_id)


class UserNotFound(NotFound):
    """No user has this id or email."""

    def __init__(self, key: object) -> None:
        super().__init__("user", key)


class InvalidTransition(CapsuleError):
    """The delivery's current status does not allow the requested action."""

    def __init__(self, delivery_id: uuid.UUID, status: str, action: str) -> None:
        self.delivery_id = delivery_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} delivery {quoted(delivery_id)}: it is {status}")


class PermissionDenied(CapsuleError):
    """The acting operator's role does not allow the action."""

    def __init__(self, actor: str, action: str) -> None:
        self.actor = actor
        self.action = action
        super().__init__(f"{actor} may not {action}")


class CryptoError(CapsuleError):
    """A letter could not be encrypted or decrypted."""


class UnknownKeyId(CryptoError):
    """The ciphertext names a key that is not in the keyring."""

    PREFIX = "encryption key "  # how its message starts (last_error is matched on it)

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"{self.PREFIX}{key_id!r} is not in the keyring")


class DecryptionFailed(CryptoError):
    """Authentication failed: wrong key, wrong letter, or tampered ciphertext."""

    def __init__(self, letter_id: uuid.UUID) -> None:
        self.letter_id = letter_id
        super().__init__(
            f"letter {quoted(letter_id)} failed authentication (tampered or wrong key)"
        )


class EnqueueError(CapsuleError):
    """The task broker refused or could not be reached."""

    def __init__(self, delivery_id: uuid.UUID, message: str) -> None:
        self.delivery_id = delivery_id
        super().__init__(f"could not enqueue delivery {quoted(delivery_id)}: {message}")


class ProviderError(CapsuleError):
    """An email provider call did not end in an accepted message."""

    error_class = "provider"

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status_code: int | None = None,
        error_code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.provider = provider
        self.status_code = status_code
        self.error_code = error_code
        self.retry_after = retry_after
        super().__init__(f"{provider}: {message}")


class TransientProviderError(ProviderError):
    """Definitely not accepted (refused, 429, 5xx, open circuit): retry later or fail over."""

    error_class = "transient"


class AmbiguousProviderError(ProviderError):
    """The request may have been accepted: retry only this provider, with the same key."""

    error_class = "ambiguous"


class PermanentProviderError(ProviderError):
    """The provider will never accept this message as it is."""

    error_class = "permanent"


class PossiblySentError(PermanentProviderError):
    """The provider says the key was already used with another payload: a human must look."""

    error_class = "possibly_sent"


class MessageBuildError(PermanentProviderError):
    """The letter could not be made into a message or request (a header the format refuses,
    text that cannot be encoded): raised before anything is sent, so it is never ambiguous.

    The message names the exception's type only: its text may quote the letter.
    """

    def __init__(self, provider: str, cause: BaseException) -> None:
        super().__init__(
            provider,
            f"the message could not be built ({type(cause).__name__}); nothing was sent",
            error_code="message_build",
        )
