# shardgate: one entry point for a fresh machine.
#   make demo   set everything up, then run the main job
#   make test   set everything up, then run every check CI runs (Rust and Python)
# Both create .venv and build the native extension (release) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv build demo test test-rust test-python lint bench bench-codec clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "maturin>=1.7,<2"

venv: $(BIN)/python

build: venv
	$(BIN)/maturin develop --release --quiet -E dev

demo: build
	$(BIN)/shardgate demo

test: test-rust lint test-python

# pyo3's build script asks the venv's interpreter (VIRTUAL_ENV is exported above).
test-rust: venv
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo test --quiet

lint: build
	$(BIN)/ruff check python tests benches
	$(BIN)/mypy --strict python/shardgate
	$(BIN)/python -m mypy.stubtest shardgate._native

test-python: build
	$(BIN)/pytest -q

bench: bench-codec

bench-codec: build
	$(BIN)/python benches/bench_codec.py

clean:
	rm -rf $(VENV) target
