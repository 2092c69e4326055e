# The two commands the README opens with, and the set-up they share.
#   make demo   the whole method end to end on the toy world (sets up .venv first)
#   make test   every test: sync check, pytest (tests/), nbdev_test (nbs/)
# Set-up: a .venv with the CPU build of torch unless an accelerator is present.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.illume_ref-installed
RUN    ?= runs/demo
NBDEV_WORKERS ?= 2

.PHONY: demo test check pytest nbtest export clean-nbs setup lab

demo: $(STAMP)
	$(BIN)/illume-ref demo --out $(RUN)

test: $(STAMP) check pytest nbtest

setup: $(STAMP)

$(STAMP): setup.py settings.ini .ci/install_torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PIP="$(BIN)/python -m pip" bash .ci/install_torch.sh
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Fails when the notebooks (the source) and illume_ref/ disagree, or notebooks are not clean.
check: $(STAMP)
	bash .ci/check_sync.sh $(BIN)

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests

nbtest: $(STAMP)
	cd nbs && ../$(BIN)/nbdev_test --n_workers $(NBDEV_WORKERS) --do_print --timing

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python .ci/nb2readme.py

lab: $(STAMP)
	$(BIN)/jupyter lab nbs
