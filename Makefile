# Two commands set up everything on a fresh machine (Python >= 3.10 and make):
#   make demo   creates .venv, installs torch==2.13.0 and metagrad, runs the default experiment (~20 s)
#   make test   same venv; ruff and the whole test suite, slow tests included
# GPU users: install their CUDA build of torch 2.13.0 into the venv first (see README), or pass
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 ; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# gives the small CPU-only wheel where the default index would resolve to the CUDA one.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_INDEX ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.metagrad-installed

.PHONY: venv demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/metagrad run sinusoid --overwrite

# pytest exits 5 when it collects no tests: that is a failure here, not a pass.
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/sinusoid.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
