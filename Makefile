# Two commands set everything up: `make serve` and `make test`. Both install from the lock files
# in requirements/ (exact versions; `make lock` refreshes them from pyproject.toml's ranges):
# serve.txt holds what serving and planning need, dev.txt that and the test tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# SkyPilot's client, for the admission-policy tests only: it pins click and uvicorn below what
# the service runs, so it lives in a venv of its own (uv makes it in seconds from the lock).
SKY_VENV ?= .venv-sky
SERVE_EXTRAS := vision,postgres,nlp,peft
DEV_EXTRAS := dev,$(SERVE_EXTRAS)
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header

.PHONY: install install-serve serve test lint typecheck unit bench clean compose-check lock spec-doc

install: $(VENV)/.installed-dev $(SKY_VENV)/.installed
install-serve: $(VENV)/.installed-serve

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "trainplan needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-serve: requirements/serve.txt pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements/serve.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements/dev.txt pyproject.toml setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@ $(VENV)/.installed-serve

$(SKY_VENV)/.installed: requirements/skypilot.txt | $(VENV)/.installed-dev
	$(BIN)/uv venv --quiet --clear --python $(PYTHON) $(SKY_VENV)
	VIRTUAL_ENV=$(SKY_VENV) $(BIN)/uv pip install --quiet -r requirements/skypilot.txt
	touch $@

# Re-resolve pyproject.toml's ranges into exact pins (x86_64 Linux, Python 3.11, as CI and the
# image run); commit the result.
lock: | $(BIN)/python
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(SERVE_EXTRAS)),--extra $(e)) $(LOCK_TARGET) -o requirements/serve.txt
	$(BIN)/uv pip compile pyproject.toml $(foreach e,$(subst $(comma), ,$(DEV_EXTRAS)),--extra $(e)) $(LOCK_TARGET) -o requirements/dev.txt
	$(BIN)/uv pip compile requirements/skypilot.in $(LOCK_TARGET) -o requirements/skypilot.txt

comma := ,

serve: install-serve
	$(BIN)/trainplan serve

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check service workers tests bench migrations
	$(BIN)/ruff format --check service workers tests bench migrations

typecheck: install
	$(BIN)/mypy service workers

# Both cores by default: one test file per worker process (pytest-xdist's loadfile), so the
# traces a file shares between its tests stay shared. PYTEST_WORKERS=0 runs in this process.
PYTEST_WORKERS ?= 2
unit: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test: lint typecheck unit

# Docker does not run here: the compose file, the Kubernetes manifests and the Dockerfile are
# checked by their tests (YAML, real commands, image names, health checks).
compose-check: install
	$(BIN)/python -m pytest -q tests/deploy/test_deploy.py

# Regenerate docs/spec.md from the API's OpenAPI schema (a test fails when it is stale).
spec-doc: install
	$(BIN)/python -m service.api.contract_doc > docs/spec.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
