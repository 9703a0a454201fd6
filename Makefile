# The two commands users need: `make run` (service on embedded defaults) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test lint run bench

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned, so pip takes the CPU wheel that lies on disk instead of a CUDA build.
venv: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[service,dev]'

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

run: venv
	$(BIN)/vqe serve
