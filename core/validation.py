"""Input a letter is refused on before anything is stored: its address, its time, its text.

Each check raises a `ValidationError` naming the field (InvalidAddress, InvalidDeliveryTime,
LetterTooLarge), so every entry point (CLI, console) can show it next to what was typed.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta

from core.errors import InvalidAddress, InvalidDeliveryTime, LetterTooLarge, ValidationError

_ADDRESS = re.compile(
    r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
MAX_SUBJECT_CHARS = 300


def normalize_address(value: str, field: str = "recipient") -> str:
    """A trimmed address with a lower-cased domain; raises InvalidAddress."""
    candidate = (value or "").strip()
    if len(candidate) > 254 or ".." in candidate or not _ADDRESS.match(candidate):
        raise InvalidAddress(field, f"{field} {value!r} is not a valid email address")
    local, _, domain = candidate.rpartition("@")
    return f"{local}@{domain.lower()}"


def validate_deliver_at(deliver_at: datetime, now: datetime, max_years: int) -> None:
    if deliver_at.tzinfo is None:
        raise InvalidDeliveryTime("deliver_at", "deliver_at must be timezone-aware")
    if deliver_at <= now:
        raise InvalidDeliveryTime(
            "deliver_at", f"deliver_at {deliver_at.isoformat()} is not in the future"
        )
    if deliver_at > now + timedelta(days=366 * max_years):
        raise InvalidDeliveryTime(
            "deliver_at",
            f"deliver_at {deliver_at.isoformat()} is more than {max_years} years ahead",
        )


# A subject is one line of text. Control characters (Cc: CR, LF, VT, FF, U+0085, NUL, ESC, TAB
# too), line and paragraph separators (Zl, Zp) and invisible format characters (Cf: bidi
# overrides, zero-width spaces, BOM) cannot be put in a mail header or would let a subject
# look like something else; such a letter could never be sent. Zero-width (non-)joiners are
# kept, and emoji tag characters: emoji sequences and several scripts need them. Surrogates (Cs) are text that was not
# UTF-8 and cannot be stored.
_SUBJECT_REFUSED = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SUBJECT_ALLOWED = frozenset({"\u200c", "\u200d"})
_CONTROL_NAMES = {
    "\t": "TAB",
    "\n": "LINE FEED",
    "\x0b": "VERTICAL TAB",
    "\x0c": "FORM FEED",
    "\r": "CARRIAGE RETURN",
    "\x85": "NEXT LINE",
    "\x00": "NUL",
    "\x1b": "ESCAPE",
}


def subject_problem(subject: str) -> str | None:
    """Why `subject` cannot be a mail subject line, or None; never quotes the subject."""
    for position, char in enumerate(subject, start=1):
        if char in _SUBJECT_ALLOWED or "\U000e0020" <= char <= "\U000e007f":
            continue  # joiners and emoji tag sequences (subdivision flags)
        category = unicodedata.category(char)
        if category in _SUBJECT_REFUSED:
            name = _CONTROL_NAMES.get(char) or unicodedata.name(char, "")
            label = f"U+{ord(char):04X}" + (f" {name}" if name else "")
            kind = (
                "text that is not UTF-8" if category == "Cs" else "a control or invisible character"
            )
            return f"the subject contains {kind} ({label}, character {position}); use one line of plain text"
    return None


def validate_letter(subject: str, body: str, max_bytes: int) -> None:
    """Refuse a letter that could never be sent as given (ValidationError naming the field)."""
    if not subject.strip():
        raise ValidationError("subject", "the subject is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise ValidationError(
            "subject", f"the subject is longer than {MAX_SUBJECT_CHARS} characters"
        )
    problem = subject_problem(subject)
    if problem:
        raise ValidationError("subject", problem)
    if not body.strip():
        raise ValidationError("body", "the letter is empty")
    if any("\ud800" <= char <= "\udfff" for char in body):
        raise ValidationError("body", "the letter contains text that is not UTF-8")
    size = len(subject.encode()) + len(body.encode())
    if size > max_bytes:
        raise LetterTooLarge("body", f"the letter is {size} bytes; the limit is {max_bytes}")
