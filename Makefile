# The two commands of the contract: `make run` and `make test` (see README.md).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: setup host venv qemu run test lint bench bench-hostvm nightly clean

setup: host venv qemu

host:
	@ci/setup-host.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Set up, build the default guests, run the smoke suite, print the table, write results/.
run: setup
	$(VENV)/bin/nestvirt doctor
	$(VENV)/bin/nestvirt run

# Set up, then the whole test suite (real QEMU under TCG here).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) -q -rs tests

# QEMU 10 beside the system's 7.2 (Debian bookworm-backports, unpacked into the cache, verified
# by starting it); it becomes the default binary. Without network or apt: a line, and on we go.
qemu: venv
	@ci/setup-host.sh --fetch-qemu $(VENV)/bin/nestvirt

lint: venv
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) ci/bench_migrate.py

# The KVM host VM: boot to ready, one nested migration inside, ten repeated (ci/bench_hostvm.py).
bench-hostvm: setup
	$(PY) ci/bench_hostvm.py

# The nightly matrix, as many variants at once as the host budget allows.
nightly: setup
	$(VENV)/bin/nestvirt run --matrix ci/nightly.yaml -j 0

clean:
	rm -rf $(VENV) results .pytest_cache
