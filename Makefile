# shardgate: one entry point for a fresh machine.
#   make demo         set everything up, then run the main job
#   make test         set everything up, then run every check CI runs (Rust and Python)
#   make wheel        build the manylinux wheel and the sdist into dist/
#   make wheel-check  build them, install the wheel where there is no Rust, run it
#   make chaos        the chaos soak at full length (1M events under faults; minutes)
#   make fuzz         coverage-guided fuzzing of the native decoder (AFL++, FUZZ_SECONDS)
# demo and test create .venv and build the native extension (release) on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv build build-runtime demo test test-rust test-python lint wheel wheel-check \
	bench bench-codec bench-shard bench-e2e chaos fuzz fuzz-replay clean

$(BIN)/python:
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip "maturin>=1.7,<2"

venv: $(BIN)/python

build: venv
	$(BIN)/maturin develop --release --quiet -E dev

# The demo needs only the runtime dependencies, and one line while Rust compiles; the
# build's own output is kept in .venv/build.log and shown only if it fails.
build-runtime: venv
	@echo "building shardgate (Rust extension, release: about 2 min the first time) ..."
	@$(BIN)/maturin develop --release > $(VENV)/build.log 2>&1 \
		|| { cat $(VENV)/build.log; echo "build failed (log: $(VENV)/build.log)"; exit 1; }

demo: build-runtime
	@$(BIN)/shardgate demo

test: test-rust lint test-python

# pyo3's build script asks the venv's interpreter (VIRTUAL_ENV is exported above).
test-rust: venv
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo test --quiet
	$(MAKE) --no-print-directory fuzz-replay

lint: build
	$(BIN)/ruff check python tests benches
	$(BIN)/mypy --strict python/shardgate
	$(BIN)/python -m mypy.stubtest shardgate._native

test-python: build
	$(BIN)/pytest -q

# Wheel: manylinux_2_17 (zig links against glibc 2.17, so no manylinux container is
# needed), abi3 (one wheel for every CPython >= 3.11), release profile of Cargo.toml (fat
# LTO, one codegen unit, stripped). The build tools live in their own venv (ziglang is
# 400 MB that neither the tests nor the demo need), the build in its own target dir (zig
# as the linker would otherwise make `make build` and `make wheel` rebuild each other).
WHEEL_VENV := .venv-wheel
DIST := dist

$(WHEEL_VENV)/bin/python:
	@$(PYTHON) -m venv $(WHEEL_VENV)
	@$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip "maturin>=1.7,<2" "ziglang==0.17.1"

wheel: $(WHEEL_VENV)/bin/python
	rm -rf $(DIST)
	PATH="$(abspath $(WHEEL_VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(WHEEL_VENV))" \
		CARGO_TARGET_DIR="$(abspath target/wheel)" $(WHEEL_VENV)/bin/maturin build --release --zig --compatibility manylinux2014 \
		--out $(DIST)
	$(WHEEL_VENV)/bin/maturin sdist --out $(DIST)
	@ls -l $(DIST)

wheel-check: wheel
	PYTHON=$(PYTHON) .ci/wheel-check $(DIST)

bench: bench-codec bench-e2e bench-shard

bench-codec: build
	$(BIN)/python benches/bench_codec.py

bench-e2e: build
	$(BIN)/python benches/bench_e2e.py

# The chaos soak at full length: 1,000,000 events, a fault every ~5,000 (benches/chaos.py;
# a bounded variant runs in `make test`). Niced: it takes minutes on a shared machine.
chaos: build
	nice $(BIN)/python benches/chaos.py

# The peer libraries (hikari, discord.py) live in their own venv, never beside shardgate's.
.venv-bench/bin/python: benches/peers/requirements.txt
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q -r benches/peers/requirements.txt

bench-shard: build .venv-bench/bin/python
	$(BIN)/python benches/bench_shard.py
	$(BIN)/python benches/bench_idle_shards.py

# Fuzzing the codec (fuzz/, benches/README.md): AFL++ through afl.rs on the stable
# toolchain (cargo-fuzz needs nightly). Not part of `make test` at this length; the kept
# inputs are replayed by `make fuzz-replay`, which test-rust runs.
FUZZ_SECONDS ?= 600
FUZZ_OUT ?= target/fuzz-afl/out
FUZZ_ENV := PYO3_PYTHON=$(abspath $(BIN))/python

fuzz: venv
	command -v cargo-afl >/dev/null || cargo install --locked cargo-afl
	cargo afl config --build 2>/dev/null || true
	cd fuzz && $(FUZZ_ENV) CARGO_TARGET_DIR=$(abspath target/fuzz-afl) \
		cargo afl build --release --features afl
	AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 \
		cargo afl fuzz -i fuzz/seeds -o $(FUZZ_OUT) -V $(FUZZ_SECONDS) \
		target/fuzz-afl/release/codec
	@echo "crashes: $$(ls $(FUZZ_OUT)/default/crashes 2>/dev/null | grep -vc README || true)"

fuzz-replay: venv
	cd fuzz && CARGO_TARGET_DIR=$(abspath target) cargo test --quiet

clean:
	rm -rf $(VENV) .venv-bench $(WHEEL_VENV) $(DIST) target
