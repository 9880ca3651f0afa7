# The two commands of the README: `make demo` and `make test`. `make bench` runs the benchmarks.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
PYTHON ?= python3
UV := $(PYTHON) -m uv
RUN := $(UV) run --frozen

.PHONY: install services lint format test demo bench clean

install:  ## uv (installed with pip if missing) and the locked environment
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen

services:  ## PostgreSQL and Redis on loopback (started if they are down)
	@infra/services.sh

lint: install
	$(RUN) ruff check amp_dagster amp_dagster_tests
	$(RUN) ruff format --check amp_dagster amp_dagster_tests

format: install
	$(RUN) ruff check --fix amp_dagster amp_dagster_tests
	$(RUN) ruff format amp_dagster amp_dagster_tests

test: install services lint
	$(RUN) pytest $(PYTEST_ARGS)

demo: install
	$(RUN) python -m amp_dagster.demo

bench: install services
	$(RUN) python -m amp_dagster_tests.benchmarks $(BENCH_ARGS)

clean:
	rm -rf .venv .pytest_cache .ruff_cache .bench .demo .dagster_home
