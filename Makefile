# Two commands set up everything on a fresh machine (Python >= 3.10 and make):
#   make demo   creates .venv, installs torch==2.13.0 and metagrad, runs the default experiment
#   make test   same venv; ruff and the whole test suite, slow tests included
#   make bench-deps  a separate .venv-bench with the peer libraries benchmarks/ compares against
# pyproject.toml declares the torch range metagrad supports; here (and so in CI, .ci/run -> make test,
# and the benchmarks) torch is exactly TORCH_PIN, the version the tests and published numbers use.
# GPU users: install their CUDA build of torch 2.13.0 into the venv first (see README), or pass
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 ; TORCH_INDEX=https://download.pytorch.org/whl/cpu
# gives the small CPU-only wheel where the default index would resolve to the CUDA one.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
TORCH_INDEX ?=
BENCH_VENV ?= .venv-bench
BBIN := $(BENCH_VENV)/bin
PYTEST_ARGS ?=
STAMP := $(VENV)/.metagrad-installed

.PHONY: venv demo test test-fast bench bench-deps clean

# pip shows its own progress bars (nothing is silenced): the torch wheel alone takes minutes to fetch.
$(STAMP): pyproject.toml
	@echo "== [1/3] virtual environment $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== [2/3] $(TORCH_PIN) (the tested version; a large download on a fresh machine)"
	$(BIN)/python -m pip install --progress-bar on $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	@echo "== [3/3] metagrad and its dependencies (extras rl: gymnasium with MuJoCo; federated: flwr, no Ray), $(TORCH_PIN) kept"
	$(BIN)/python -m pip install --progress-bar on -e ".[dev,rl,federated]" "$(TORCH_PIN)"
	touch $(STAMP)
	@echo "== installed: $$($(BIN)/python -c 'import torch; print("torch", torch.__version__)')"

venv: $(STAMP)

demo: venv
	@echo "== running the default experiment: metagrad run sinusoid"
	$(BIN)/metagrad run sinusoid --overwrite

# pytest exits 5 when it collects no tests: that is a failure here, not a pass.
test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

bench: venv
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/sinusoid.py

# The peers of benchmarks/speed.py and omniglot_budget.py in their own venv (benchmarks/README.md):
# the `bench` extra (higher, torchopt) and learn2learn 0.2.0, whose sdist's C must be regenerated
# with cython to build on Python 3.11. torch stays $(TORCH_PIN).
bench-deps:
	test -x $(BBIN)/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BBIN)/python -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)" numpy
	$(BBIN)/python -m pip install -e ".[bench,dev]" "$(TORCH_PIN)" cython
	rm -rf $(BENCH_VENV)/l2l && mkdir -p $(BENCH_VENV)/l2l
	cd $(BENCH_VENV)/l2l && ../bin/python -m pip download --no-deps --no-binary :all: learn2learn==0.2.0 \
	  && tar xzf learn2learn-0.2.0.tar.gz && cd learn2learn-0.2.0 \
	  && for f in meta_dataset task_dataset transforms; do ../../bin/cython -3 learn2learn/data/$$f.pyx; done \
	  && ../../bin/python -m pip install --no-build-isolation --no-deps .
	$(BBIN)/python -m pip install requests scipy gym==0.26.2 "$(TORCH_PIN)"
	# learn2learn imports torchvision, which has no build for this torch: benchmarks/speed.py stubs it.
	cd benchmarks && ../$(BBIN)/python -c 'import speed, torch, higher, torchopt; speed._stub_torchvision(); \
	  import learn2learn; print("peers ready; torch", torch.__version__)'

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
