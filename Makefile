# shardgate: one entry point for a fresh machine.
#   make demo   set everything up, then run the main job
#   make test   set everything up, then run every check CI runs (Rust and Python)
# Both create .venv and build the native extension (release) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv build demo test test-rust test-python lint bench bench-codec bench-shard bench-e2e clean

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

bench: bench-codec bench-e2e bench-shard

bench-codec: build
	$(BIN)/python benches/bench_codec.py

bench-e2e: build
	$(BIN)/python benches/bench_e2e.py

# The peer libraries (hikari, discord.py) live in their own venv, never beside shardgate's.
.venv-bench/bin/python: benches/peers/requirements.txt
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q -r benches/peers/requirements.txt

bench-shard: build .venv-bench/bin/python
	$(BIN)/python benches/bench_shard.py
	$(BIN)/python benches/bench_idle_shards.py

clean:
	rm -rf $(VENV) .venv-bench target
