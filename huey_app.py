"""The consumer's entry module: `huey_consumer huey_app.huey`.

It imports the queue (tasks.queue: the single Huey instance, built from settings) and every
task module, so the consumer knows every task; and it sets up what only a consumer needs: our
logging and the telemetry started with each worker. Nothing imports this module back.
"""

from __future__ import annotations

from typing import Any

from huey.consumer_options import ConsumerConfig

from tasks.queue import huey, settings

__all__ = ["huey"]


def _consumer_logging(config: ConsumerConfig, logger: Any = None) -> None:
    """`huey_consumer` calls this once, before the consumer starts: our logging (format and
    level from CAPSULE_LOG_FORMAT and CAPSULE_LOG_LEVEL; Huey's -v / -q set the default level) instead of Huey's own
    handler, so Huey's lines come out in the same format as ours."""
    from core.logs import configure_logging

    configure_logging(settings, default_level=config.loglevel)


ConsumerConfig.setup_logger = _consumer_logging  # type: ignore[method-assign]


@huey.on_startup(name="capsule.telemetry")
def start_telemetry() -> None:
    """Each worker calls this when the consumer starts; the first call does the work:
    Sentry (with its Huey integration) and, with CAPSULE_METRICS_PORT, the /metrics server."""
    from sentry_sdk.integrations.huey import HueyIntegration

    from core.metrics import serve_metrics
    from core.telemetry import init_sentry

    init_sentry(settings, component="consumer", integrations=[HueyIntegration()])
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.metrics_addr)


# After the hooks above, so each worker starts telemetry before the periodic module's marker watch.
import tasks.bulk  # noqa: E402
import tasks.delivery  # noqa: E402  (registers the tasks with `huey`)
import tasks.periodic  # noqa: E402
import tasks.webhooks  # noqa: E402,F401
