# `make demo` prepares the shipped corpus, trains a tokenizer and the tiny model, and samples from it.
# `make test` runs the test suite. Both create .venv and install CPU torch + the package first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= runs/demo
DEMO_STEPS ?= 400
# `make demo DEMO_ARGS=--overwrite` trains the demo's model again in an existing $(DEMO_DIR)
DEMO_ARGS ?=

.PHONY: venv demo test lint clean

$(BIN)/hybridlm: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -e ".[dev,serve,hf]"
	touch $@

venv: $(BIN)/hybridlm

test: venv
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check src tests

demo: venv
	$(BIN)/hybridlm demo --out $(DEMO_DIR) --steps $(DEMO_STEPS) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs
