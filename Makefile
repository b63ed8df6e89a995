# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export OMP_WAIT_POLICY := PASSIVE
export OMP_NUM_THREADS ?= 2

.PHONY: demo test bench clean-demo

$(BIN)/neuralmaps: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/neuralmaps

# Capture 300 x 150 m of Helsinki (digital twin), build, export, localize, preview: demo/summary.json.
demo: $(BIN)/neuralmaps
	$(BIN)/neuralmaps demo --out demo

test: $(BIN)/neuralmaps
	$(BIN)/python -m pytest -q

bench: $(BIN)/neuralmaps
	$(BIN)/python benchmarks/bench_synth.py
	$(BIN)/python benchmarks/bench_localizer.py

clean-demo:
	rm -rf demo
