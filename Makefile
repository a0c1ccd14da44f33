# pluto-k8s developer and CI entry points.  `make help` lists them.
#
# The venv uses a *strict* editable install: setuptools links every package file
# into build/__editable__.* at install time, so a module added later is invisible
# until the install is redone. `make venv` therefore tracks two things: the
# dependencies (pyproject.toml: full install) and the set of package files
# (re-link only, --no-deps).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STRICT := --config-settings editable_mode=strict
# The machine's local wheel store (torch), when there is one.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
PIP := $(PY) -m pip --disable-pip-version-check
PIP_LOG := $(VENV)/pip-install.log
# pip's (and setuptools') chatter goes to PIP_LOG; its tail is shown when pip fails.
PIP_INSTALL = run_pip() { $(PIP) install $(FIND_LINKS) "$$@" >>$(PIP_LOG) 2>&1 \
	|| { echo "pip install $$* failed; tail of $(PIP_LOG):" >&2; tail -n 40 $(PIP_LOG) >&2; \
	     return 1; }; }; run_pip

DEPS_STAMP := $(VENV)/.stamp-deps
LINK_STAMP := $(VENV)/.stamp-links
MANIFEST := $(VENV)/.package-files
PACKAGE_DIRS := pluto server sidecar operator
KONDUKTOR_VERSION := 0.1.0.dev20261027031956
# Typed code outside the packages that pyproject's [tool.mypy] lists.
MYPY_EXTRA := tests/support tests/conftest.py tests/test_infra_smoke.py examples/train.py
# pytest worker processes of `make test` (pytest-xdist): most tests wait on the servers,
# sidecars and trainers they start, so two workers keep two cores busy. 1: one process, in
# order; auto: one per core.
PYTEST_WORKERS ?= 2

.PHONY: help venv postgres chromium fault-tools test lint demo bench bench-anchors chaos e2e-kind clean distclean FORCE

help:
	@echo "make venv      create/refresh .venv (pip install -e '.[dev]', strict editable)"
	@echo "make postgres  install PostgreSQL (Debian) unless initdb/postgres already exist"
	@echo "make chromium  install Chromium (Debian) for the browser tests unless it exists"
	@echo "make fault-tools  install libfiu's fiu-run/fiu-ctrl (Debian) for the I/O-error tests"
	@echo "make lint      ruff + mypy"
	@echo "make test      lint, then pytest on PYTEST_WORKERS processes (default 2; needs venv,"
	@echo "              postgres, chromium and fault-tools)"
	@echo "make demo      local server + 2-rank torchrun training, a fork, its lineage"
	@echo "make bench     benchmarks (prints tables; see docs/benchmarks.md)"
	@echo "make bench-anchors  log() and end to end against wandb, trackio, neptune-scale, mlflow"
	@echo "              (installs them into .venv-anchors, about 1 GB; about 10 minutes)"
	@echo "make chaos     the long fault-injection suite (kill -9 rounds, long outages)"
	@echo "make e2e-kind  end to end on a throwaway kind cluster (needs Docker and kind)"
	@echo "make clean     remove caches; make distclean also removes .venv, build/, .pluto-data/, .pluto/"

venv: $(LINK_STAMP)

# Full install: only when pyproject.toml changes (or the venv is new).
$(DEPS_STAMP): pyproject.toml
	@echo "==> venv: installing .[dev] into $(VENV) (python: $(PYTHON), log: $(PIP_LOG))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@: > $(PIP_LOG)
	@$(PIP_INSTALL) --upgrade pip
	@$(PIP_INSTALL) -e '.[dev]' $(STRICT)
	@# Only konduktor's task templates are used (tests render a Konduktor pod with them); its
	@# own dependencies pin an older kubernetes client and pull cloud SDKs, so none are taken.
	@$(PIP_INSTALL) --no-deps 'konduktor-nightly==$(KONDUKTOR_VERSION)'
	@touch $@

# The sorted list of package files; rewritten only when it changes, so its mtime
# says "a module was added, removed or renamed".
$(MANIFEST): FORCE
	@mkdir -p $(VENV)
	@{ find $(PACKAGE_DIRS) -type f \( -name '*.py' -o -name 'py.typed' -o -name '*.mako' \) \
		-not -path '*/__pycache__/*' 2>/dev/null || true; } | LC_ALL=C sort > $@.tmp
	@if cmp -s $@.tmp $@; then rm -f $@.tmp; else mv $@.tmp $@; fi

# Re-link when the package files changed after the last install or re-link.
# (MANIFEST is listed first: a full install that runs after it links everything.)
$(LINK_STAMP): $(MANIFEST) $(DEPS_STAMP)
	@if [ $(MANIFEST) -nt $(DEPS_STAMP) ] && { [ ! -e $@ ] || [ $(MANIFEST) -nt $@ ]; }; then \
		echo "==> venv: re-linking the editable install (package files changed)"; \
		$(PIP_INSTALL) --no-deps -e . $(STRICT); \
	fi
	@touch $@

# $(call apt_install,TARGET,PACKAGE): apt-get install a Debian package, as root or through
# sudo; the caller checks afterwards that what it needs is there.
apt_install = SUDO=""; \
	if [ "$$(id -u)" -ne 0 ]; then \
		if command -v sudo >/dev/null; then SUDO="sudo"; \
		else echo "$(1): need root or sudo to apt-get install $(2)" >&2; exit 1; fi; \
	fi; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null

# Install PostgreSQL only when no server binaries are present
# (PG_FORCE_INSTALL=1 runs the install branch anyway: apt-get makes it a no-op).
postgres:
	@if [ -z "$${PG_FORCE_INSTALL:-}" ] && compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
		&& compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then \
		echo "==> postgres: found $$(dirname $$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1))"; \
	elif [ -z "$${PG_FORCE_INSTALL:-}" ] && command -v initdb >/dev/null \
		&& command -v postgres >/dev/null; then \
		echo "==> postgres: found $$(dirname $$(command -v initdb))"; \
	else \
		echo "==> postgres: no initdb/postgres found (or PG_FORCE_INSTALL); apt-get install postgresql"; \
		$(call apt_install,postgres,postgresql); \
		compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
			|| { echo "postgres: install finished but initdb is still missing" >&2; exit 1; }; \
		echo "==> postgres: installed $$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"; \
	fi

# Install Chromium (the dashboard's browser tests drive it headless through Playwright,
# which must never download a browser of its own) only when it is missing.
chromium:
	@if [ -z "$${CHROMIUM_FORCE_INSTALL:-}" ] && [ -x /usr/bin/chromium ]; then \
		echo "==> chromium: found /usr/bin/chromium"; \
	else \
		echo "==> chromium: no /usr/bin/chromium (or CHROMIUM_FORCE_INSTALL); apt-get install chromium"; \
		$(call apt_install,chromium,chromium); \
		[ -x /usr/bin/chromium ] \
			|| { echo "chromium: install finished but /usr/bin/chromium is still missing" >&2; exit 1; }; \
		echo "==> chromium: installed $$(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"; \
	fi

# Install libfiu's tools (fiu-run, fiu-ctrl) only when they are missing: the chaos tests
# make a real sidecar's fsync fail with EIO through libfiu's POSIX preload library.
fault-tools:
	@if [ -z "$${FIU_FORCE_INSTALL:-}" ] && command -v fiu-run >/dev/null && command -v fiu-ctrl >/dev/null; then \
		echo "==> fault-tools: found $$(command -v fiu-run)"; \
	else \
		echo "==> fault-tools: no fiu-run/fiu-ctrl (or FIU_FORCE_INSTALL); apt-get install fiu-utils"; \
		$(call apt_install,fault-tools,fiu-utils); \
		command -v fiu-run >/dev/null && command -v fiu-ctrl >/dev/null \
			|| { echo "fault-tools: install finished but fiu-run/fiu-ctrl are still missing" >&2; exit 1; }; \
		echo "==> fault-tools: installed $$(command -v fiu-run)"; \
	fi

lint: venv
	@echo "==> ruff"
	@$(BIN)/ruff check .
	@echo "==> mypy (packages from pyproject.toml)"
	@$(BIN)/mypy
	@echo "==> mypy (test support, examples)"
	@$(BIN)/mypy $(MYPY_EXTRA)

test: venv postgres chromium fault-tools
	@$(MAKE) lint
	@echo "==> pytest"
	@# The 15 slowest tests are listed at the end: the suite must stay under 25 min on 2 cores.
	@# --dist loadfile: a module's tests run in one worker, so module-scoped servers and
	@# databases start once, as they do in a serial run.
	@$(BIN)/pytest -q --durations=15 $(if $(filter 1,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)

demo: venv
	@bash scripts/demo.sh

bench: venv
	@$(PY) benchmarks/sdk_log.py
	@$(PY) benchmarks/sidecar.py
	@$(PY) benchmarks/webhook.py
	@$(PY) benchmarks/checkpoints.py
	@$(PY) benchmarks/dashboard.py
	@$(PY) benchmarks/lineage.py
	@$(PY) benchmarks/imports.py

# Other trackers, pinned in benchmarks/anchors/requirements.txt, in a venv of their own.
bench-anchors: venv
	@$(PY) benchmarks/anchors/compare.py

chaos: venv postgres fault-tools
	@PLUTO_CHAOS=1 $(BIN)/pytest -q -m chaos tests/chaos

e2e-kind: venv
	@tests/e2e/kind.sh

clean:
	@find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .pytest_cache \
		-o -name .mypy_cache -o -name .ruff_cache -o -name .hypothesis \) -prune \
		-exec rm -rf {} +

# build/ holds the strict editable link tree: it goes together with the venv.
distclean: clean
	@rm -rf $(VENV) build *.egg-info .pluto-data .pluto

FORCE:
