# octpipe: `make demo` runs the main job on bundled defaults, `make test` the default test run.
# Both create .venv when missing. torch is installed first, pinned to the CPU build 2.13.0,
# so that no multi-GB CUDA build is pulled in by the project's `torch` requirement.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.octpipe-installed
TORCH_PIN := torch==2.13.0
DEMO_OUT ?= demo-output

.PHONY: demo test test-all lint env clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25.1"
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e . --group dev
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/octpipe demo -o $(DEMO_OUT) --overwrite

# the default run spreads its tests over the CPU's cores (pytest-xdist; at most 4 workers)
test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q -n auto --maxprocesses=4

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check octpipe tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
