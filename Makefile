# Two commands set everything up: `make serve` and `make test`. Both start with `make install`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,vision,postgres,nlp,peft
STAMP := $(VENV)/.installed

.PHONY: install serve test lint typecheck unit bench clean compose-check

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "trainplan needs Python 3.11+"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

serve: install
	$(BIN)/trainplan serve

lint: install
	$(BIN)/ruff check service workers tests bench migrations
	$(BIN)/ruff format --check service workers tests bench migrations

typecheck: install
	$(BIN)/mypy service workers

unit: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck unit

compose-check: install
	$(BIN)/python deploy/check_manifests.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
