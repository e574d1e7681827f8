# The two commands of the README:  `make repro` (set up + run the pipeline)  and  `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export UNSLOTH_DISABLE_STATISTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-fast clean-venv

setup: $(VENV)/.installed

# torch==2.13.0 is in pyproject's dependencies, so pip resolves it in the same command as
# unsloth and takes the CPU build (a plain `pip install unsloth` pulls a 3 GB CUDA torch).
# PyPI's torchvision, pulled in by unsloth, breaks `import unsloth` beside the CPU torch: remove it.
# -e: the titletune package is imported from this checkout, so an edit takes effect at once.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $@

repro: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest -q -ra

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow"

clean-venv:
	rm -rf $(VENV)
