"""Webhook settings: a malformed secret, credential pair or network fails at start, by name."""

from __future__ import annotations

import pytest

from core.config import Settings
from core.errors import ConfigError


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CAPSULE_RESEND_WEBHOOK_SECRETS", "not-a-whsec"),
        ("CAPSULE_RESEND_WEBHOOK_SECRETS", "whsec_abc,whsec_%%%"),
        ("CAPSULE_POSTMARK_WEBHOOK_CREDENTIALS", "user-without-password"),
        ("CAPSULE_POSTMARK_WEBHOOK_CREDENTIALS", ":password"),
        ("CAPSULE_POSTMARK_WEBHOOK_ALLOWED_IPS", "10.0.0.0/8,not-an-ip"),
        ("CAPSULE_WEBHOOK_GRACE_SECONDS", "-1"),
    ],
)
def test_a_malformed_webhook_setting_is_refused_by_name(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable


def test_rotation_lists_are_read_in_order_and_never_shown() -> None:
    settings = Settings.from_env(
        {
            "CAPSULE_RESEND_WEBHOOK_SECRETS": "whsec_b2xk, whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "CAPSULE_POSTMARK_WEBHOOK_CREDENTIALS": "pm:old-pass,pm:new-pass",
            "CAPSULE_POSTMARK_WEBHOOK_ALLOWED_IPS": "3.134.147.250, 10.0.0.0/8",
        }
    )
    assert settings.resend_webhook_secrets == (
        "whsec_b2xk",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    assert settings.postmark_webhook_credentials == ("pm:old-pass", "pm:new-pass")
    assert "old-pass" not in repr(settings) and "whsec" not in repr(settings)
