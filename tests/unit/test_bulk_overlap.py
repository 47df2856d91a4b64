"""When two bulk filters could match the same failed delivery: a pure function."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.bulk import ANY_SAFE_CLASS, RISKY_CLASSES, effective, risk_warnings
from core.failed_filter import FailedFilter, overlaps

JAN = datetime(2030, 1, 1, tzinfo=UTC)
FEB = datetime(2030, 2, 1, tzinfo=UTC)
MAR = datetime(2030, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (FailedFilter(), FailedFilter(), True),
        (FailedFilter(error_classes=("transient",)), FailedFilter(), True),
        (
            FailedFilter(error_classes=("transient",)),
            FailedFilter(error_classes=("permanent",)),
            False,
        ),
        (
            FailedFilter(error_classes=("transient", "permanent")),
            FailedFilter(error_classes=("permanent",)),
            True,
        ),
        (FailedFilter(provider="resend"), FailedFilter(provider="postmark"), False),
        (FailedFilter(provider="resend"), FailedFilter(), True),
        (
            FailedFilter(recipient_domain="gmail.com"),
            FailedFilter(recipient_domain="@Gmail.com"),
            True,
        ),
        (
            FailedFilter(recipient_domain="gmail.com"),
            FailedFilter(recipient_domain="web.de"),
            False,
        ),
        (FailedFilter(failed_until=JAN), FailedFilter(failed_from=FEB), False),
        (FailedFilter(failed_from=JAN, failed_until=FEB), FailedFilter(failed_from=FEB), True),
        (FailedFilter(failed_from=JAN, failed_until=MAR), FailedFilter(failed_until=FEB), True),
        # a text search can never prove two filters apart
        (FailedFilter(search="ada"), FailedFilter(search="bob"), True),
        # "any class" of a bulk operation leaves the risky classes out
        (effective(FailedFilter()), FailedFilter(error_classes=("ambiguous",)), False),
        (effective(FailedFilter()), FailedFilter(error_classes=("decryption",)), False),
    ],
)
def test_overlaps(a: FailedFilter, b: FailedFilter, expected: bool) -> None:
    assert overlaps(a, b) is expected and overlaps(b, a) is expected


def test_any_class_means_the_classes_safe_to_send_again() -> None:
    assert set(ANY_SAFE_CLASS) == {"transient", "permanent", "lease_expired"}
    assert set(RISKY_CLASSES) == {"ambiguous", "possibly_sent", "decryption"}
    assert effective(FailedFilter()).error_classes == ANY_SAFE_CLASS
    named = FailedFilter(error_classes=("ambiguous",))
    assert effective(named) == named


def test_risk_warnings_are_the_single_row_dialogs() -> None:
    assert risk_warnings({"transient": 4}) == []
    [arrived] = risk_warnings({"ambiguous": 2, "possibly_sent": 1, "transient": 9})
    assert arrived.startswith("3 of these may already have reached the recipient")
    assert "(ambiguous, possibly_sent)" in arrived and "get the letter twice" in arrived
    [unreadable] = risk_warnings({"decryption": 1})
    assert unreadable.startswith("1 of these could not be decrypted")
