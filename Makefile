# Two entry points on a fresh machine with Python 3.11: `make demo` and `make test`.
# Each creates .venv and installs bdgrid (with its test extras) when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,postgres]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bdgrid run examples/quickstart.yaml --out runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/data_pipeline.py

clean:
	rm -rf runs previews .pytest_cache
