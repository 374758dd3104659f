# The book's two commands (see README.md):
#   make book   execute every chapter with papermill on a profile, then build the Jupyter Book into _build/html
#   make test   notebooks and package in sync, the embedded book, pytest (with the browser test of it); building the
#               book executes every notebook once with papermill, and that run is the notebooks' test
# Both set up what is missing first (.venv with the pinned packages, chromium for the tests) and are safe to rerun.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= embedded
DATA_ROOT ?=
DEVICE ?=
FORCE ?=
ESTIMATE ?=
TEST_WORKERS ?= 2
# chapters executed at once; auto: 2 when the profile's device is the CPU (a chapter keeps about one core busy), else 1
BOOK_JOBS ?= auto
PIP_FLAGS := --disable-pip-version-check --progress-bar off -q
PIP_NOISE := WARNING: Location .* is ignored
BOOK_ARGS := --profile $(PROFILE) --jobs $(BOOK_JOBS) $(if $(DATA_ROOT),--param data_root=$(DATA_ROOT)) $(if $(DEVICE),--param device=$(DEVICE)) $(if $(FORCE),--force) $(if $(ESTIMATE),--estimate)

.PHONY: book test setup sync nbdev-test pytest chromium lab clean
.DEFAULT_GOAL := book

book: setup
	$(PY) -m tools.build_book $(BOOK_ARGS)

test: setup chromium sync book pytest
	@echo "==> all tests passed"

setup: $(VENV)/.installed

# Re-installs only when the pins change; an interrupted install leaves no marker and is resumed by pip.
$(VENV)/.installed: requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	@echo "==> setting up $(VENV) with $(PYTHON) (pinned packages; the first time takes a few minutes)"
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: Python 3.11 or newer is needed, and $(PYTHON) is $$($(PYTHON) -V 2>/dev/null || echo "not a working Python"): install python3.11 (Debian/Ubuntu: apt install python3.11 python3.11-venv) or pass PYTHON=/path/to/python3.11" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -c 'import ensurepip' 2>/dev/null || { echo "error: $(PYTHON) cannot create a virtual environment (no ensurepip): install its venv package (Debian/Ubuntu: apt install python3.11-venv), or pass PYTHON=/path/to/python3.11" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -r requirements.txt -c constraints.txt 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PY) -m pip install $(PIP_FLAGS) --no-deps -r requirements-nodeps.txt 2> >(grep -v "$(PIP_NOISE)" >&2)
	$(PY) -m pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e . 2> >(grep -v "$(PIP_NOISE)" >&2)
	@touch $@

sync: setup
	@echo "==> checking that nbdev_export and nbdev_clean leave nbs/ and contrastive_explanations/ unchanged"
	@bash tools/check_nbdev_sync.sh $(VENV)/bin

# Not part of `make test` (the book's papermill run executes every notebook already): nbdev's own runner, on demand.
nbdev-test: setup
	@echo "==> nbdev_test: running every notebook in nbs/"
	$(VENV)/bin/nbdev_test --n_workers 1 --timing  # one notebook at a time: each uses both cores

# Two pytest workers, one test file each at a time (a module's fixtures are built once): the fixture book's module
# starts first on one worker while the other takes the rest of the files. TEST_WORKERS=0 runs them in this process.
# Side by side, OpenMP threads that spin while they wait slow both workers several-fold: they sleep instead
# (OMP_WAIT_POLICY=PASSIVE changes how threads wait, not how work is split).
pytest: setup chromium
	@echo "==> pytest ($(TEST_WORKERS) workers)"
	$(if $(filter 0,$(TEST_WORKERS)),,OMP_WAIT_POLICY=PASSIVE) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "==> installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "chromium is missing: run 'sudo apt-get install chromium' (Debian) for the browser test" >&2; exit 1; fi; }

lab: setup
	$(VENV)/bin/jupyter lab nbs/

clean:
	rm -rf _build executed test-artifacts
