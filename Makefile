# ksm-lab: `make demo` runs the main job, `make test` passes the tests (fresh Debian host, root).
# Every target is idempotent: it installs what it needs and skips what is already there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
PYTEST := $(PY) -m pytest -p no:cacheprovider
# Shipped inside the package, so an installed wheel runs the same script (`ksm-lab host setup`).
HOST_SETUP := bash orchestrator/guests/host-setup.sh
export DEBIAN_FRONTEND := noninteractive

.PHONY: help host venv test-deps demo quickstart test test-fast test-vm test-faults wheel-check bench clean-host

help:
	@echo "make demo        host set-up, venv, guest image (cached), run plans/demo.toml (VMs + sysbench)"
	@echo "make quickstart  run plans/quickstart.toml (no VMs, ~3 min)"
	@echo "make test        the whole test suite, VM end-to-end tests included"
	@echo "make test-fast   tests without VMs or a browser"
	@echo "make test-faults the whole fault matrix (real VM sweeps killed and healed, ~15 min)"
	@echo "make wheel-check build the wheel, install it outside the checkout, run it (quickstart included)"
	@echo "make bench       print the benchmark figures"

# Debian packages (QEMU, libvirt, build deps of libvirt-python) and virtlogd/libvirtd running.
host:
	$(HOST_SETUP)

$(STAMP):
	$(HOST_SETUP) --packages-only
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Test-only packages (Chromium, sysbench, MariaDB): installed with service starts denied, every
# package that was not there recorded; `make test` purges exactly those after the tests.
test-deps:
	bash scripts/test-deps.sh install

# Each run gets its own results folder: a study folder is never overwritten.
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

demo: host venv
	$(PY) -m orchestrator image build
	$(PY) -m orchestrator sweep plans/demo.toml --results results/$(RUN_ID)
	@echo "results: results/$(RUN_ID)/demo (report: results/$(RUN_ID)/demo/report/report.html)"

quickstart: venv
	$(PY) -m orchestrator sweep plans/quickstart.toml --results results/$(RUN_ID)
	@echo "results: results/$(RUN_ID)/quickstart"

# Tests run one at a time: several change the host's one KSM and must not overlap. Then the
# wheel check proves the installed (not editable) ksm-lab works too, quickstart study included.
# Whatever fails, the daemons `host` started are stopped and the test packages removed after.
test: host venv test-deps
	rc=0; $(PY) -m ruff check orchestrator tests benchmarks scripts contrib || rc=1; \
	  $(PY) -m ruff format --check orchestrator tests benchmarks scripts contrib || rc=1; \
	  $(PY) -m orchestrator image build && { $(PYTEST) tests -ra -m "not faults" || rc=$$((rc ? rc : $$?)); } || rc=$$((rc ? rc : 1)); \
	  PYTHON=$(PY) bash scripts/wheel-check.sh || rc=$$((rc ? rc : 1)); \
	  $(HOST_SETUP) --stop; bash scripts/test-deps.sh remove; exit $$rc

test-fast: venv
	$(PY) -m ruff check orchestrator tests benchmarks scripts contrib
	$(PY) -m ruff format --check orchestrator tests benchmarks scripts contrib
	$(PYTEST) tests -ra -m "not vm and not browser"

test-vm: host venv
	$(PYTEST) tests -ra -m "vm and not faults"

# The whole fault matrix: a real VM sweep killed at each point, then healed (~15 min here).
test-faults: host venv
	$(PYTEST) tests -ra -m faults

# The venv installs editable (your edits take effect at once); this checks the wheel instead.
wheel-check: venv
	PYTHON=$(PY) bash scripts/wheel-check.sh $(WHEEL_CHECK_ARGS)

bench: venv
	$(PY) benchmarks/fill_rate.py
	$(PY) benchmarks/sampler_overhead.py
	$(PY) benchmarks/report_speed.py
	$(PY) benchmarks/history_speed.py
	$(PY) benchmarks/stats_calibration.py
	$(PY) benchmarks/stats_calibration_decisions.py

clean-host:
	$(PY) -m orchestrator cleanup
	$(HOST_SETUP) --stop
