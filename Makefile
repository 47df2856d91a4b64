# Capsule delivery. Two commands are the whole setup: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSUMER_FLAGS ?= -w 4 -k thread
PORT ?= 8501
# make test runs the suite in 4 pytest processes (pytest-xdist): most of its time is waiting on
# consumers, servers and a browser, and those waits overlap (about 10 min instead of 25 on a
# 2-core machine; docs/benchmarks.md). TEST_WORKERS=1 make test runs it in one.
TEST_WORKERS ?= 4
CHAOS_FLAGS ?=

.PHONY: run test setup lint typecheck unit mutate bench bench-render chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## make run: embedded default (SQLite + SqliteHuey + file outbox under var/), demo data,
## a consumer and the console on http://127.0.0.1:$(PORT) (this machine only)
run: setup
	$(BIN)/capsule keys generate --if-missing
	$(BIN)/capsule db upgrade
	$(BIN)/capsule demo
	@echo "console:  http://127.0.0.1:$(PORT)  (demo mode: signed in as a demo ops user)"
	@echo "try:      $(BIN)/capsule schedule --user ada0@demo.capsule.localhost --to you@example.com --at +5s --subject Hi --body 'Dear future me'"
	@echo "letters:  $${CAPSULE_VAR_DIR:-var}/outbox/*.eml"
	@trap 'trap - INT TERM EXIT; kill 0' INT TERM EXIT; \
	  $(BIN)/huey_consumer huey_app.huey $(CONSUMER_FLAGS) & \
	  CAPSULE_DEMO_MODE=true $(BIN)/streamlit run console/app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true & \
	  wait

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy core

## make test: lint, types, and the whole suite (SQLite, PostgreSQL, Redis, SMTP, HTTP, browser)
## (TEST_WORKERS=N: in N processes); the 15 slowest tests are listed at the end
test: lint typecheck
	$(BIN)/pytest -q $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist load) --durations=15

unit: setup
	$(BIN)/pytest -q tests/unit

## make mutate: the mutation check of the invariants: each guard removed in turn must fail the
## tests chosen for it (SQLite + PostgreSQL; a few minutes). docs/mutation.md lists them.
mutate: setup
	$(BIN)/python -m tests.mutate

## make bench: hot path, burst, recovery, scale and memory benchmarks on PostgreSQL + Redis
## (127.0.0.1; minutes each); figures are printed and written under benchmarks/results/
## (docs/benchmarks.md)
bench: setup
	$(BIN)/python -m benchmarks.hotpath --profile
	$(BIN)/python -m benchmarks.burst
	$(BIN)/python -m benchmarks.recovery
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.memory

## make bench-render: every console page in a real Chromium at 1,000,000 deliveries on
## PostgreSQL, time to first full render (a few minutes; docs/benchmarks.md, Console render)
bench-render: setup
	$(BIN)/python -m benchmarks.console_render

## make chaos: the chaos soak (SIGKILLs, a broker wipe, a PostgreSQL restart, provider faults);
## exits non-zero if a letter is lost or sent twice. CHAOS_FLAGS=--no-pg-restart spares the server.
chaos: setup
	$(BIN)/python -m benchmarks.chaos $(CHAOS_FLAGS)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
