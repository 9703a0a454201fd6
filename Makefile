# The two commands users need: `make run` (service on embedded defaults) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test lint format run bench bench-quality

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned, so pip takes the CPU wheel that lies on disk instead of a CUDA build.
venv: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[service,postgres,dev]'

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

run: venv
	$(BIN)/vqe serve

# The speed, side-info and load benchmarks (minutes on 2 CPU cores); each writes JSON under
# bench/results/. The quality table takes about 50 minutes: `make bench-quality`.
bench: venv
	$(BIN)/python -m bench.side_info
	$(BIN)/python -m bench.frame_time --footage ../shared/footage --frames 24
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.load

bench-quality: venv
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/quality.py --footage ../shared/footage
