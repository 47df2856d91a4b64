"""The production Huey instance plus one no-op task, for the raw-throughput comparison.

`huey_consumer benchmarks.noop_app.huey -w 4 -k thread` runs the deliver task and the periodic
safety nets exactly as `huey_app.huey` does, and also `bench.noop`.
"""

from __future__ import annotations

from huey_app import huey

__all__ = ["huey", "noop"]


@huey.task(name="bench.noop")
def noop() -> None:
    return None
