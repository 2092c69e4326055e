# The two commands the README opens with, and the set-up they share.
#   make demo          the whole method end to end on the toy world (sets up .venv first)
#   make test          every test: sync check, pytest (tests/), nbdev_test (nbs/)
# Set-up: a .venv installed from the lock file .ci/constraints.txt (the exact versions CI last passed with,
# torch's CPU build included; on a machine with a GPU or NPU, torch's default build instead).
#   make test-latest   the same tests in a fresh .venv-latest with the newest releases (no lock)
#   make test-oldest   the same tests in a fresh .venv-oldest with the oldest releases the requirements allow
#                      for the libraries pinned in .ci/constraints-oldest.txt
#   make lock          make test-latest, then write its versions to .ci/constraints.txt (commit the result)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
LOCK   ?= .ci/constraints.txt
STAMP  := $(VENV)/.illume_ref-installed
RUN    ?= runs/demo
NBDEV_WORKERS ?= 2
PIP    := $(BIN)/python -m pip

.PHONY: demo test check pytest nbtest export clean-nbs setup lab test-latest test-oldest lock

demo: $(STAMP)
	$(BIN)/illume-ref demo --out $(RUN)

test: $(STAMP) check pytest nbtest

setup: $(STAMP)

# With LOCK set, every package comes from the lock (torch is installed first, by .ci/install_torch.sh, and
# its line is left out of the constraints pip sees, so a GPU machine keeps its CUDA build).
$(STAMP): setup.py settings.ini .ci/install_torch.sh $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip $(if $(LOCK),-c $(LOCK))
	PIP="$(PIP)" LOCK="$(LOCK)" bash .ci/install_torch.sh
	$(if $(LOCK),grep -v '^torch==' $(LOCK) > $(VENV)/constraints.txt)
	$(PIP) install --quiet -e ".[dev]" $(if $(LOCK),-c $(VENV)/constraints.txt)
	touch $(STAMP)

# Fails when the notebooks (the source) and illume_ref/ disagree, or notebooks are not clean.
check: $(STAMP)
	bash .ci/check_sync.sh $(BIN)

pytest: $(STAMP)
	$(BIN)/python -m pytest -q tests

nbtest: $(STAMP)
	cd nbs && ../$(BIN)/nbdev_test --n_workers $(NBDEV_WORKERS) --do_print --timing

test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest LOCK=
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|diffusers|accelerate|datasets|tokenizers|huggingface.hub)=='

test-oldest:
	rm -rf .venv-oldest
	$(MAKE) test VENV=.venv-oldest LOCK=.ci/constraints-oldest.txt

lock: test-latest
	.venv-latest/bin/python -m pip freeze --all --exclude-editable | grep -v '^illume' > .ci/constraints.txt
	@echo "wrote .ci/constraints.txt from the newest releases that passed 'make test'; commit it"

export: $(STAMP)
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python .ci/nb2readme.py

lab: $(STAMP)
	$(BIN)/jupyter lab nbs
