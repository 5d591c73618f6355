# Two entry points a fresh machine needs: `make demo` and `make test`.
# Both create .venv, install the pinned requirements and build the extension splitlora._C first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# Set TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) to take torch from another index.
TORCH_INDEX ?=
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
EXT_SOURCES := setup.py pyproject.toml $(wildcard csrc/*)
PYTEST_ARGS ?=

.PHONY: all venv deps build demo test bench clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements.txt | $(PY)
	@if [ -n "$(TORCH_INDEX)" ]; then $(PY) -m pip install torch==2.13.0 --index-url "$(TORCH_INDEX)"; fi
	$(PY) -m pip install -r requirements.txt
	touch $@

deps: $(DEPS_STAMP)

# --no-build-isolation: build against the torch in .venv (the extension's ABI must match it).
$(BUILD_STAMP): $(DEPS_STAMP) $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

build: $(BUILD_STAMP)

# Writes runs/demo/int8 and runs/demo/fp32 (`splitlora eval runs/demo` evaluates both); a rerun
# replaces an earlier demo's runs there (--overwrite), which plain `splitlora demo` refuses to do.
demo: build
	$(PY) -m splitlora demo --overwrite

# pytest exits 5 when it collected no test: that must fail, not pass silently.
test: build
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# CPU benchmarks (a few minutes on 2 cores); see bench/RESULTS.md for the GPU commands.
bench: build
	$(PY) -m bench.bench_codec --device cpu --out runs/bench
	$(PY) -m bench.bench_lora --device cpu --out runs/bench

clean:
	rm -rf build *.egg-info splitlora/_C*.so $(BUILD_STAMP)
