"""The settle window (DESIGN.md invariant 7): a lagging search's "not found" is trusted only
once the search has had time to index a message sent by an earlier run."""

from __future__ import annotations

from datetime import timedelta

import pytest

from core.config import Settings
from core.errors import ConfigError
from core.models import ErrorClass
from core.providers.base import Accepted
from core.providers.chain import ProviderChain
from core.providers.postmark import PostmarkProvider
from tests.fakes.fixtures import make_email
from tests.unit.test_chain import T0, Scripted

SETTLED = T0 + timedelta(seconds=120)


class Lagging(Scripted):
    """A provider whose search shows a message some time after it was accepted (Postmark)."""

    lookup_lags = True


def test_postmark_declares_that_its_search_lags() -> None:
    assert PostmarkProvider.lookup_lags is True


def test_pinned_not_found_before_the_window_closes_sends_nothing_and_waits_pinned() -> None:
    postmark = Lagging("postmark")

    outcome = ProviderChain([postmark]).send(
        make_email(), pinned="postmark", now=T0, settle_until=SETTLED
    )

    assert postmark.lookups == 1 and postmark.sent == []
    assert outcome.error_class == ErrorClass.AMBIGUOUS and outcome.pinned_provider == "postmark"
    assert outcome.deferred, "waiting for the search must not use up an attempt"
    assert outcome.retry_after == 120.0


def test_pinned_not_found_once_the_window_has_closed_sends_with_the_same_provider() -> None:
    postmark, resend = Lagging("postmark"), Scripted("resend")

    outcome = ProviderChain([postmark, resend]).send(
        make_email(), pinned="postmark", now=SETTLED, settle_until=SETTLED
    )

    assert outcome.sent and outcome.provider == "postmark"
    assert len(postmark.sent) == 1 and resend.sent == []


def test_pinned_found_during_the_window_is_sent() -> None:
    postmark = Lagging("postmark", found=Accepted("postmark", "pm-1", 200))

    outcome = ProviderChain([postmark]).send(
        make_email(), pinned="postmark", now=T0, settle_until=SETTLED
    )

    assert outcome.sent and outcome.provider_message_id == "pm-1" and postmark.sent == []


def test_a_provider_whose_lookup_does_not_lag_is_trusted_at_once() -> None:
    outbox = Scripted("outbox")

    outcome = ProviderChain([outbox]).send(
        make_email(), pinned="outbox", now=T0, settle_until=SETTLED
    )

    assert outcome.sent and len(outbox.sent) == 1


def test_look_first_after_a_lost_run_waits_for_a_lagging_search_and_sends_nowhere() -> None:
    postmark, resend = Lagging("postmark"), Scripted("resend", can_look_up=False)

    outcome = ProviderChain([postmark, resend]).send(
        make_email(), look_first=True, now=T0, settle_until=SETTLED
    )

    assert postmark.sent == [] and resend.sent == []
    assert outcome.error_class == ErrorClass.LEASE_EXPIRED and outcome.pinned_provider is None
    assert outcome.deferred and outcome.retry_after == 120.0


def test_look_first_once_settled_sends_as_before() -> None:
    postmark, resend = Lagging("postmark"), Scripted("resend")

    outcome = ProviderChain([postmark, resend]).send(
        make_email(), look_first=True, now=SETTLED, settle_until=SETTLED
    )

    assert outcome.sent and outcome.provider == "postmark"


def test_settle_seconds_is_a_setting_that_must_not_be_negative() -> None:
    assert Settings.from_env({}).lookup_settle_seconds == 120
    assert Settings.from_env({"CAPSULE_LOOKUP_SETTLE_SECONDS": "0"}).lookup_settle_seconds == 0
    with pytest.raises(ConfigError):
        Settings.from_env({"CAPSULE_LOOKUP_SETTLE_SECONDS": "-1"})
