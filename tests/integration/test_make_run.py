"""`make run`, the README's first command, on the embedded default with no services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from benchmarks.harness import ROOT, wait_for
from tests.fakes.smtp_server import free_port


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_make_run_seeds_the_demo_serves_the_console_and_delivers_to_the_outbox(
    tmp_path: Path,
) -> None:
    var = tmp_path / "var"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPSULE_")}
    env |= {"CAPSULE_VAR_DIR": str(var), "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    log = (tmp_path / "make-run.log").open("wb")
    run = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    capsule = [str(ROOT / ".venv" / "bin" / "capsule")]
    try:
        # The console comes up on the seeded demo data
        wait_for(
            lambda: answers(f"http://127.0.0.1:{port}/_stcore/health"),
            timeout=120,
            what="console health",
        )
        assert (var / "capsule.db").exists() and (var / "keys").exists()
        assert "seeded demo" in (tmp_path / "make-run.log").read_text()

        # A letter scheduled three seconds ahead is delivered by make run's consumer
        done = subprocess.run(
            [
                *capsule,
                "schedule",
                "--user",
                "ada0@demo.capsule.localhost",
                "--to",
                "me@example.com",
                "--at",
                "+3s",
                "--subject",
                "Hi",
                "--body",
                "Dear future me, from the make run test",
            ],
            env=env,
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        delivery_id = done.stdout.strip()

        def status() -> str:
            out = subprocess.run(
                [*capsule, "status", delivery_id], env=env, capture_output=True, text=True, cwd=ROOT
            )
            return str(json.loads(out.stdout)["status"]) if out.returncode == 0 else "?"

        wait_for(lambda: status() == "sent", timeout=60, interval=1, what="the letter sent")
        key = json.loads(
            subprocess.run(
                [*capsule, "status", delivery_id], env=env, capture_output=True, text=True, cwd=ROOT
            ).stdout
        )["attempts"][0]
        assert key["provider"] == "outbox" and key["outcome"] == "accepted"
        letters = [
            p for p in (var / "outbox").glob("*.eml") if "from the make run test" in p.read_text()
        ]
        assert len(letters) == 1
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        try:
            run.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
        log.close()
