# The two commands of the README: `make demo` and `make test`. `make dev` serves the demo code location in Dagster's
# UI; `make bench` runs the benchmarks.
SHELL := /bin/bash
export UV_PYTHON_DOWNLOADS := never
export UV_LINK_MODE := copy
PYTHON ?= python3
UV := $(PYTHON) -m uv
RUN := $(UV) run --frozen

.PHONY: install services chromium lint format test demo dev bench clean

install:  ## uv (installed with pip if missing) and the locked environment
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen

services:  ## PostgreSQL and Redis on loopback (started if they are down)
	@infra/services.sh

chromium:  ## Debian's Chromium for the end-to-end UI test (about 50 s the first time)
	@test -x /usr/bin/chromium || { echo "installing chromium for the UI test"; \
	  sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$sudo apt-get install -y chromium || { $$sudo apt-get update && $$sudo apt-get install -y chromium; }; }

lint: install
	$(RUN) ruff check amp_dagster amp_dagster_tests
	$(RUN) ruff format --check amp_dagster amp_dagster_tests

format: install
	$(RUN) ruff check --fix amp_dagster amp_dagster_tests
	$(RUN) ruff format amp_dagster amp_dagster_tests

# three workers on two cores: much of the suite waits on servers and child processes (about 9 minutes here)
test: install services chromium lint
	$(RUN) pytest -n 3 --dist worksteal $(PYTEST_ARGS)

demo: install  ## the demo code location run headless through Dagster (stores and instance under .demo/headless)
	$(RUN) python -m amp_dagster.demo

# A dev server on :1602 (a block a second from 15000000) and `dagster dev` on 127.0.0.1:3000 with the demo code
# location; the instance lives in .demo/dagster_home, the stores under .demo. Ctrl-C stops both.
DEV_HOME := $(CURDIR)/.demo/dagster_home
dev: install
	@mkdir -p $(DEV_HOME) && cp dagster.yaml $(DEV_HOME)/dagster.yaml
	@$(RUN) amp-dagster devserver --blocks 1000 --start-block 15000000 --block-time 1 & \
	  devserver=$$!; trap 'kill $$devserver 2>/dev/null; wait $$devserver 2>/dev/null' EXIT; \
	  DAGSTER_HOME=$(DEV_HOME) AMP_DEMO_DIR=$(CURDIR)/.demo $(RUN) dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install services
	$(RUN) python -m amp_dagster_tests.benchmarks $(BENCH_ARGS)

clean:
	rm -rf .venv .pytest_cache .ruff_cache .bench .demo .dagster_home
