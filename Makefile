# Two commands: `make demo` and `make test`. Both create .venv from nothing when needed, installing exactly
# the versions in requirements.lock (pip-compile output: every package pinned, every file hashed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# PYTHONDONTWRITEBYTECODE cleared: where the environment sets it, every process (each test's subprocess,
# each Ray worker) would compile torch and transformers again; cleared, the first import of a module
# writes its bytecode and later ones read it
RUNENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=
# the one place the lock's resolution flags live: `make lock` and `make test-latest` read the same extras
EXTRAS := test,ray
PIP_TOOLS := pip-tools==7.6.2

.PHONY: demo test venv lock test-latest clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# --require-hashes: every file must match the lock, so a re-run next month installs the same bytes.
	# torch is locked as 2.13.0+cpu; pip finds that CPU wheel through its find-links or an extra index
	# (README: Dependencies); a plain PyPI torch would be a multi-GB CUDA build.
	# --no-compile: of the venv's ~17,500 modules the suite imports ~5,000; compiling them all ahead
	# (pip one at a time, or compileall) took 40 s of CI's 10 minutes. Imports write the bytecode of
	# what they use (RUNENV clears PYTHONDONTWRITEBYTECODE).
	$(BIN)/pip install --disable-pip-version-check -q --no-compile --require-hashes --no-deps -r $(LOCK)
	# the project itself, built with the locked setuptools: nothing unlocked comes in
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	mkdir -p runs
	$(RUNENV) $(BIN)/moeguard audit --out runs/demo

# The suite runs in TEST_WORKERS pytest-xdist processes (2: CI's two cores; `make test TEST_WORKERS=8` on a
# bigger machine), each torch, OpenMP and BLAS on one thread. Most tests are Python-bound on tiny models,
# so two single-thread workers finish in ~60% of the time one two-thread process takes (273-285 s against
# 459-561 s side by side here, benchmarks/suite_workers.py). The thread caps are set before Python
# starts: left to their defaults, two workers' OpenMP pools spun against each other (653 s).
# worksteal: a few end-to-end tests take 20-40 s each; an idle worker takes queued tests from a busy one.
TEST_WORKERS ?= 2
TESTENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE

test: $(STAMP)
	$(RUNENV) $(TESTENV) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# Refresh the lock to the newest versions pyproject.toml's ranges allow (needs the package index).
# Run `make test-latest` first: raise a range or refresh the lock only when that passes.
lock:
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/pip install -q $(PIP_TOOLS))
	.venv-tools/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe --all-build-deps --strip-extras \
	  --no-emit-index-url --no-emit-find-links $(foreach e,$(subst $(comma), ,$(EXTRAS)),--extra=$(e)) \
	  -o $(LOCK) pyproject.toml

# The whole suite in a separate venv built from the newest versions the ranges allow (torch stays 2.13.0):
# the check to run before raising a range or refreshing the lock. It prints what differs from the lock.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --disable-pip-version-check -q torch==2.13.0
	.venv-latest/bin/pip install --disable-pip-version-check -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	.venv-latest/bin/python -m moeguard.lockdiff $(LOCK)
	$(RUNENV) $(TESTENV) MOEGUARD_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) .venv-latest .venv-tools runs .pytest_cache

comma := ,
