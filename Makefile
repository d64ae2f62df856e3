# fusedopt: `make test` and `make bench` set up .venv, build the extensions, and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
MAX_JOBS ?= 2
export MAX_JOBS
# pytest processes (pytest-xdist), a test file per process so a file's fixtures (spawned gloo worlds) run once.
# OMP_WAIT_POLICY=PASSIVE: OpenMP threads of one process sleep instead of spinning while the other holds the cores
# (spinning made the CPU-kernel tests 1.5x slower than one process).
TEST_WORKERS ?= 2

.PHONY: all venv build test test-fast bench bench-quick lint info clean

all: test

$(DEPS_STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(DEPS_STAMP)

# In-place build (ninja, incremental): the tests and the bench import fusedopt from this checkout.
# fusedopt/triton_kernels is a symlink to triton_kernels/ here; setup.py's package_dir does the same in a wheel.
build: $(DEPS_STAMP)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests --junitxml=build/junit.xml

bench: build
	$(PY) -m bench

bench-quick: build
	$(PY) -m bench --quick

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

info: build
	$(PY) -m fusedopt info

clean:
	rm -rf build fusedopt/*.so *.egg-info
