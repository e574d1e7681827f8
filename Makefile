# The two commands of the README:  `make repro` (set up + run the pipeline)  and  `make test`.
# `make gguf` adds llama.cpp and writes the GGUF files; `make serve` serves them.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000
# llama.cpp through llama-cpp-python (pinned in pyproject's `gguf` extra): its sdist vendors llama.cpp,
# whose converter (convert_hf_to_gguf.py, conversion/, gguf-py/) goes to $(LLAMA_CPP)
# (titletune.export.gguf.TOOLS). The sdist and the wheel built from it live in $(WHEELS), outside
# the venv, so that the wheel can build while the venv installs.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SDIST := llama_cpp_python-$(LLAMA_CPP_PYTHON)
WHEELS    := build/wheels
LLAMA_WHEEL := $(WHEELS)/.$(LLAMA_SDIST)-built
LLAMA_CPP := $(VENV)/share/llama.cpp
export DVC_NO_ANALYTICS := 1
export UNSLOTH_DISABLE_STATISTICS := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup setup-gguf repro gguf serve test test-fast clean-venv

setup: $(VENV)/.installed
# Two jobs: llama-cpp-python's wheel compiles while the venv's pip install, which keeps one core
# of two busy (153 s, 141 s of CPU), runs beside it: 283 s for both, 339 s one after the other.
setup-gguf:
	$(MAKE) -j2 $(VENV)/.gguf-installed

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

# llama.cpp builds from source (no Linux wheels): ~2 min on 2 cores. GGML_NATIVE=OFF: a -march=native
# build segfaults quantizing on AMX Xeons (llama.cpp #20824). LLAVA_BUILD=OFF: no multimodal library
# (mtmd), which a text model never loads; and then no llama.cpp `common` library either, which only
# mtmd uses but llama-cpp-python's CMakeLists forces on (the sed): 108 s on 2 cores (230 s with
# `common`, 306 s with mtmd too).
# The sdist is downloaded once; the wheel is built from a patched copy by a pip of the same
# interpreter (a throwaway venv's: a system Python may have no pip of its own), so the venv can
# install it; the converter is taken out of the sdist.
$(LLAMA_WHEEL):
	@echo "building llama-cpp-python $(LLAMA_CPP_PYTHON) (llama.cpp, ~2-3 min)"
	rm -rf $(WHEELS)/venv $(WHEELS)/src && $(PY) -m venv $(WHEELS)/venv
	$(WHEELS)/venv/bin/pip download -q --no-deps --no-binary llama-cpp-python -d $(WHEELS) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	mkdir -p $(WHEELS)/src && tar -xzf $(WHEELS)/$(LLAMA_SDIST).tar.gz -C $(WHEELS)/src --strip-components=1
	sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE/set(LLAMA_BUILD_COMMON $${LLAVA_BUILD} CACHE/' $(WHEELS)/src/CMakeLists.txt
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(WHEELS)/venv/bin/pip wheel -q --no-deps -w $(WHEELS) $(WHEELS)/src
	rm -rf $(WHEELS)/venv $(WHEELS)/src
	touch $@

# --find-links: pip takes the wheel built above for llama-cpp-python (the index has only the sdist).
$(VENV)/.gguf-installed: $(VENV)/.installed $(LLAMA_WHEEL)
	rm -rf $(LLAMA_CPP) && mkdir -p $(LLAMA_CPP)
	tar -xzf $(WHEELS)/$(LLAMA_SDIST).tar.gz -C $(LLAMA_CPP) --strip-components=3 \
	    $(addprefix $(LLAMA_SDIST)/vendor/llama.cpp/,LICENSE convert_hf_to_gguf.py conversion gguf-py models/ggml-vocab-llama-bpe.gguf)
	$(BIN)/pip install -q --find-links $(WHEELS) -e '.[dev,gguf]'
	$(BIN)/pip uninstall -y -q torchvision || true
	touch $@

# The pipeline without the gguf stage (evaluate and export need every other stage), so that a fresh
# machine needs no llama.cpp build; `make gguf` adds it.
repro: setup
	dvc repro evaluate export

gguf: setup-gguf
	dvc repro gguf

serve: setup-gguf
	$(BIN)/python -m titletune.export.serve --host $(HOST) --port $(PORT)

# Two pytest workers (pytest-xdist) with one torch thread each: most of the suite is subprocesses that
# import torch, transformers and Unsloth on one core. On 2 cores the suite took 739 s in one process,
# 562 s in two workers, 478 s with one thread each, 443 s with worksteal and the pipeline tests first
# (tests/conftest.py says why).
# WORKERS=N for more cores; WORKERS=0 runs it in this one process.
WORKERS ?= 2
PYTEST  := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -ra -n $(WORKERS) --dist worksteal

test: setup-gguf
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

clean-venv:
	rm -rf $(VENV)
