# syntax=docker/dockerfile:1
#
# Capsule delivery: one image for every role of the production shape (see docker-compose.yml
# and docs/operations.md). The role is chosen by the command:
#   consumer (default CMD)  huey_consumer huey_app.huey ...
#   console                 streamlit run console/app.py ...
#   one-shot / cron         capsule db upgrade | capsule reconcile | capsule health | ...
#
# Build:  docker build -t capsule-delivery .
#
# Stage 1 builds every wheel (the project's and its dependencies'); stage 2 installs them from
# the wheel directory only (--no-index), so the final image holds no compiler, no build
# backend and no pip cache. Every runtime dependency ships binary wheels for CPython 3.11 on
# x86_64 and aarch64, so the builder needs no apt packages either.

# ---------------------------------------------------------------- builder
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src

# Optional extras from pyproject.toml to bake in, comma-separated (none are needed to run;
# sentry-sdk is a regular dependency): e.g.
#   docker build --build-arg EXTRAS=dev -t capsule-delivery .
ARG EXTRAS=""

# Dependencies first: this layer is rebuilt only when pyproject.toml (or EXTRAS) changes, not
# on every code change.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e.strip() for e in os.environ.get('EXTRAS', '').split(',') if e.strip()]; \
print('\n'.join(project['dependencies'] + [r for e in extras for r in project['optional-dependencies'][e]]))" \
    > requirements.txt \
 && pip wheel --no-cache-dir --wheel-dir /wheels -r requirements.txt

# Then the project itself (a pure-Python wheel: core, tasks, console, huey_app).
COPY README.md ./
COPY huey_app.py ./
COPY core ./core
COPY tasks ./tasks
COPY console ./console
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------- runtime
FROM python:3.11.13-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="capsule-delivery" \
      org.opencontainers.image.description="Letters to one's future self: sent once, on time, never silently lost."

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CAPSULE_VAR_DIR=/app/var \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    STREAMLIT_BROWSER_SERVER_ADDRESS=localhost

# Streamlit: no usage statistics, and a set browser.serverAddress, without which a headless
# server bound to 0.0.0.0 asks a public "what is my IP" service at start. Set the console's
# real host name in .env (STREAMLIT_BROWSER_SERVER_ADDRESS).

# An unprivileged user with a fixed uid/gid (volume permissions stay predictable).
RUN groupadd --system --gid 10001 capsule \
 && useradd --system --uid 10001 --gid capsule --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin capsule

# Install from the builder's wheels only; the bind mount keeps the wheels out of every layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index /wheels/*.whl \
 && /opt/venv/bin/capsule --help > /dev/null \
 && /opt/venv/bin/huey_consumer --help > /dev/null \
 && /opt/venv/bin/streamlit version > /dev/null

WORKDIR /app

# `streamlit run console/app.py` takes a file path and reads .streamlit/config.toml from the
# working directory, so the console's files are also laid out under /app. The code stays owned
# by root: the app cannot rewrite itself. Only var/ (embedded mode, scratch) is writable.
COPY .streamlit ./.streamlit
COPY console ./console
RUN mkdir -p /app/var && chown capsule:capsule /app/var

USER 10001:10001

EXPOSE 8501

# Health is per role, so it is declared in docker-compose.yml, not here: the console answers
# GET /_stcore/health; a consumer runs `capsule consumer-health` (broker reachable, its
# /metrics answering: set CAPSULE_METRICS_PORT), and the system-wide check is `capsule health`
# (docs/operations.md).
HEALTHCHECK NONE

# The consumer with the production flags; docker-compose.yml documents each one.
CMD ["huey_consumer", "huey_app.huey", "--workers", "4", "--worker-type", "thread", "--graceful-signal", "TERM", "--shutdown-timeout", "45"]
