# Capsule delivery. Two commands are the whole setup: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONSUMER_FLAGS ?= -w 4 -k thread
PORT ?= 8501

.PHONY: run test setup lint typecheck unit bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## make run: embedded default (SQLite + SqliteHuey + file outbox under var/), demo data,
## a consumer and the console on http://localhost:$(PORT)
run: setup
	$(BIN)/capsule keys generate --if-missing
	$(BIN)/capsule db upgrade
	$(BIN)/capsule user add demo@capsule.localhost --name "Demo" --credits 0 >/dev/null
	$(BIN)/capsule demo
	@echo "consumer: $(BIN)/huey_consumer huey_app.huey $(CONSUMER_FLAGS)"
	@trap 'kill 0' INT TERM EXIT; \
	  $(BIN)/huey_consumer huey_app.huey $(CONSUMER_FLAGS) & \
	  wait

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy core

## make test: lint, types, and the whole suite (SQLite, PostgreSQL, Redis, SMTP, HTTP, browser)
test: lint typecheck
	$(BIN)/pytest -q

unit: setup
	$(BIN)/pytest -q tests/unit

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
