"""Real processes for end-to-end tests and benchmarks: Huey consumers, CLI runs.

A `System` is one deployment under test: a database URL, a broker (Redis db + key prefix, or
SqliteHuey under var/), provider settings; it builds the environment every process shares.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class System:
    var_dir: Path
    database_url: str
    key_entry: str
    redis_url: str | None = None
    huey_name: str = "capsule"
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
        env |= {
            "CAPSULE_VAR_DIR": str(self.var_dir),
            "CAPSULE_DATABASE_URL": self.database_url,
            "CAPSULE_ENCRYPTION_KEYS": self.key_entry,
            "CAPSULE_HUEY_NAME": self.huey_name,
            "PYTHONUNBUFFERED": "1",
        }
        if self.redis_url:
            env["CAPSULE_REDIS_URL"] = self.redis_url
        env |= self.settings
        return env

    def capsule(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "capsule"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )


class Consumer:
    """A `huey_consumer huey_app.huey` process in its own process group."""

    def __init__(
        self,
        system: System,
        *,
        workers: int = 4,
        flags: tuple[str, ...] = (),
        log: Path | None = None,
    ) -> None:
        self.system = system
        self.args = [
            str(BIN / "huey_consumer"),
            "huey_app.huey",
            "-w",
            str(workers),
            "-k",
            "thread",
            *flags,
        ]
        self.log_path = log or system.var_dir / f"consumer-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Consumer:
        self.system.var_dir.mkdir(parents=True, exist_ok=True)
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.args,
            env=self.system.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        handle.close()
        wait_for(
            lambda: "consumer started" in self.log().lower() or not self.alive,
            timeout=30,
            what="consumer start",
        )
        if not self.alive:
            raise RuntimeError(f"consumer exited at start:\n{self.log()}")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no cleanup, in-flight work lost, as in a crash."""
        if self.process and self.alive:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.alive:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def _own_group_dying_with_parent() -> None:
    """In the child: its own process group (so a SIGKILL takes its threads and children), and
    SIGKILL when the test process dies, however it dies (a killed pytest runs no teardown)."""
    os.setsid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_for(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
