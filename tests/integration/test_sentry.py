"""Letter text and secrets never reach Sentry or the logs (DESIGN.md invariant 8).

End to end: a real consumer and real CLI runs report to a local HTTP server standing in for
Sentry; a send fails in a way nobody planned for (the outbox directory is not writable); an
event arrives, and the letter's subject and body appear nowhere in the bytes received.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from benchmarks.harness import BIN, ROOT, Consumer, System, wait_for
from core import alerts
from core.bootstrap import App
from core.config import Settings
from core.policy import utcnow
from tasks.delivery import HueyEnqueuer, deliver
from tasks.queue import make_huey
from tests.conftest import KEY_ENTRY
from tests.fakes.sentry_server import FakeSentry

SUBJECT = "Zebra quartz lantern 7d1f"
BODY = "Marmalade octopus under the 93ab bridge, my secret plans"
TOKEN = "T0KEN-s3cr3t-9f8e7d"


def _not_writable(consumer: Consumer, directory: Path) -> None:
    """Make `directory` read-only for the consumer, even when the tests run as root."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o500)
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a directory unwritable")
        # root writes anywhere through CAP_DAC_OVERRIDE: start the consumer without it
        consumer.args = [
            setpriv,
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--",
            *consumer.args,
        ]


def crashes(sentry: FakeSentry) -> list[dict]:
    """Events of tasks that raised, as reported by sentry-sdk's Huey integration."""
    return [
        event
        for event in sentry.events()
        if (event.get("exception") or {}).get("values", [{}])[-1].get("mechanism", {}).get("type")
        == "huey"
    ]


def test_an_unwritable_outbox_reaches_sentry_without_the_letter_text(tmp_path: Path) -> None:
    # Given the embedded default with Sentry on, and an outbox the consumer cannot write
    var = tmp_path / "var"
    with FakeSentry() as sentry:
        system = System(var_dir=var, database_url="", key_entry=KEY_ENTRY)
        system.settings = {
            "CAPSULE_DATABASE_URL": f"sqlite:///{var / 'capsule.db'}",
            "CAPSULE_SENTRY_DSN": sentry.dsn,
        }
        assert system.capsule("db", "upgrade").returncode == 0
        assert system.capsule("user", "add", "me@example.com", "--credits", "1").returncode == 0
        consumer = Consumer(system, workers=2)
        _not_writable(consumer, var / "outbox")
        consumer.start()
        try:
            # When a letter with a distinctive subject and body falls due
            scheduled = system.capsule(
                "schedule",
                "--user",
                "me@example.com",
                "--to",
                "future@example.com",
                "--at",
                "+2s",
                "--subject",
                SUBJECT,
                "--body",
                BODY,
            )
            assert scheduled.returncode == 0, scheduled.stderr

            # Then the failure reaches Sentry as an event ...
            def outbox_event() -> bool:
                return any(
                    value.get("type") == "PermissionError"
                    for event in sentry.events()
                    for value in (event.get("exception") or {}).get("values", [])
                )

            wait_for(outbox_event, timeout=60, what="the outbox failure at the fake Sentry")

            # And a task that crashes is reported by the Huey integration with its task name
            queue = make_huey(Settings.from_env(system.env))
            HueyEnqueuer(queue)  # registers capsule.deliver with this queue
            queue.enqueue(deliver.s("not-a-delivery-id"))

            def task_event() -> bool:
                return bool(crashes(sentry))

            wait_for(task_event, timeout=30, what="the crashed task at the fake Sentry")
        finally:
            consumer.stop()
        received = sentry.received()
        log = consumer.log()

    # ... and neither the subject nor the body is anywhere in what Sentry received
    for secret in (SUBJECT, BODY):
        for fragment in (secret, *secret.split(" ")[:2]):
            assert fragment.encode() not in received, f"{fragment!r} reached Sentry"
    assert b"future@example.com" not in received  # addresses are masked too
    [event] = [e for e in sentry.events() if e.get("logger") == "core.providers.outbox"][:1]
    frames = [
        frame
        for value in event["exception"]["values"]
        for frame in (value.get("stacktrace") or {}).get("frames", [])
    ]
    assert frames and not any("vars" in frame for frame in frames)
    assert event["tags"]["component"] == "consumer"
    [crash] = crashes(sentry)[:1]
    assert crash["extra"]["huey-job"] == {"task": "capsule.deliver", "retry": 0}
    assert crash["exception"]["values"][-1]["type"] == "ValueError"
    assert b"not-a-delivery-id" not in received  # task arguments are not sent
    # nor in the consumer's own log
    assert SUBJECT not in log and BODY not in log
    assert "cannot be written" in log


# ---------------------------------------------------------------- tokens in URLs (logs)


class _Answer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(503)
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def failing_hook() -> Iterator[str]:
    """A webhook and heartbeat endpoint that answers 503; its URLs carry a token."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("db_kind", ["sqlite"], indirect=True)
def test_failing_webhook_and_heartbeat_log_host_and_status_never_the_token(
    app: App, failing_hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a webhook and a heartbeat URL with tokens in path and query, both answering 503
    app.settings = app.settings.replace(
        alert_webhook_url=f"{failing_hook}/hooks/{TOKEN}",
        heartbeat_url=f"{failing_hook}/ping?token={TOKEN}",
    )
    alerter = alerts.Alerter(app.settings, app.session_factory)
    caplog.set_level(logging.DEBUG, logger="core")

    # When an alert is posted and the heartbeat pinged
    assert alerter.alert(alerts.STUCK, "12 stuck rows", now=utcnow()) is False
    assert alerter.heartbeat() is False

    # Then the log names the host and the status, and never the token
    messages = [r.getMessage() for r in caplog.records if r.name == "core.alerts"]
    assert "alert webhook failed for stuck_rows: host 127.0.0.1: HTTP 503" in messages
    assert "heartbeat ping failed: host 127.0.0.1: HTTP 503" in messages
    assert TOKEN not in caplog.text


def test_unreachable_webhook_and_heartbeat_log_no_token(caplog: pytest.LogCaptureFixture) -> None:
    # Given URLs with tokens on a port where nothing listens
    settings = Settings(
        alert_webhook_url=f"http://127.0.0.1:9/hooks/{TOKEN}",
        heartbeat_url=f"http://user:{TOKEN}@127.0.0.1:9/ping?token={TOKEN}",
    )
    alerter = alerts.Alerter(settings, session_factory=None)  # type: ignore[arg-type]
    caplog.set_level(logging.DEBUG, logger="core")

    # When both fail to connect
    assert alerter._post("stuck_rows", "3 stuck rows") is False
    assert alerter.heartbeat() is False

    # Then the error type and host are logged, the token is not
    assert "host 127.0.0.1: ConnectError" in caplog.text
    assert TOKEN not in caplog.text


def test_a_crashing_cli_process_reports_without_its_arguments(tmp_path: Path) -> None:
    # Given a process started like `capsule schedule --subject ... --body ...` with Sentry on
    script = (
        "import sys\n"
        "from core.config import Settings\n"
        "from core.telemetry import init_sentry\n"
        "init_sentry(Settings.from_env(), component='cli')\n"
        "raise RuntimeError('unexpected failure')\n"
    )
    with FakeSentry() as sentry:
        system = System(var_dir=tmp_path / "var", database_url="", key_entry=KEY_ENTRY)
        system.settings = {"CAPSULE_SENTRY_DSN": sentry.dsn}
        # When it dies of an uncaught exception
        subprocess.run(
            [str(BIN / "python"), "-c", script, "schedule", "--subject", SUBJECT, "--body", BODY],
            env=system.env,
            cwd=ROOT,
            capture_output=True,
            timeout=60,
        )
        wait_for(lambda: sentry.events(), timeout=15, what="the crash at the fake Sentry")
        received = sentry.received()

    # Then the crash is reported, and the letter text on its command line is not
    [event] = sentry.events()
    assert event["exception"]["values"][-1]["type"] == "RuntimeError"
    assert event["tags"]["component"] == "cli"
    assert SUBJECT.encode() not in received and BODY.encode() not in received
