"""`huey_consumer huey_app.huey ...` with this process's clock off by SKEWED_CLOCK_SECONDS (test
only): every place the product reads the clock (`core.policy.utcnow` and the names and default
arguments bound to it) reads real time plus the skew. Huey's own scheduler keeps real time, as
a broker on another machine would.

    SKEWED_CLOCK_SECONDS=-3 python -m tests.skewed_consumer huey_app.huey -w 2 -k thread
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta


def install(skew: timedelta) -> None:
    import core.policy

    real = core.policy.utcnow

    def skewed() -> datetime:
        return real() + skew

    core.policy.utcnow = skewed
    import huey_app  # noqa: F401  (imports the task modules, which bind utcnow by name)
    from core.providers.chain import ProviderChain
    from core.worker import run_delivery

    for module in list(sys.modules.values()):
        if getattr(module, "utcnow", None) is real:
            module.utcnow = skewed  # type: ignore[attr-defined]
    for function in (run_delivery, ProviderChain.send):
        defaults = function.__kwdefaults__ or {}
        if defaults.get("clock") is real:
            defaults["clock"] = skewed


def main() -> None:
    install(timedelta(seconds=float(os.environ["SKEWED_CLOCK_SECONDS"])))
    from huey.bin.huey_consumer import consumer_main

    sys.argv = ["huey_consumer", *sys.argv[1:]]
    consumer_main()


if __name__ == "__main__":
    main()
