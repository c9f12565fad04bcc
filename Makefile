# The contributor's front door: every routine action is one target.
#   make serve   set everything up and start tiergate on 127.0.0.1:50051
#   make test    set everything up and run every check CI runs
# Both create .venv and install all they need from PyPI and crates.io by name.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
EXT    := $(VENV)/.extension-built
export VIRTUAL_ENV := $(abspath $(VENV))
# Release builds of the extension: the tests and the demo measure real speed.
MATURIN_FLAGS ?= --release
PROTOS := $(wildcard proto/tiergate/v1/*.proto)
PROTO_OUT := $(PROTOS:proto/%.proto=serve/%_pb2.py)
RUST_SOURCES := $(shell find rust_core -name '*.rs' -o -name Cargo.toml 2>/dev/null) Cargo.toml

.PHONY: help proto serve demo fuzz bench-frontend bench-model bench-ingress bench-load test lint lint-rust lint-python test-rust test-python stubtest build bench bench-quick fmt clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	# uv resolves and installs far faster than pip on a clean machine.
	$(BIN)/python -m pip install --quiet --upgrade pip uv

$(DEPS): pyproject.toml requirements/cpu-overrides.txt | $(BIN)/python
	$(BIN)/uv pip install --python $(BIN)/python -r pyproject.toml \
		--extra dev --extra train --extra cpu --override requirements/cpu-overrides.txt
	@touch $@

$(EXT): $(DEPS) $(RUST_SOURCES) $(PROTO_OUT)
	$(BIN)/maturin develop $(MATURIN_FLAGS) --uv
	@touch $@

# Python code generated from proto/ (not committed: it is build output).
$(PROTO_OUT): $(PROTOS) $(DEPS)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=serve --pyi_out=serve \
		--grpc_python_out=serve $(PROTOS)

proto: $(PROTO_OUT)  ## generate the gRPC code from proto/

build: $(EXT)  ## build tiergate._core into .venv

# The embedded default: a small bundle trained on the example intents the
# project ships (authored by us), served on localhost: local Ray, the model tiers
# on CPU. `make serve DATA=tickets.jsonl` trains on your data instead (JSONL, CSV
# or CLINC150 JSON; see `tiergate train --help`).
EXAMPLES := serve/tiergate/examples
DATA ?=
ifeq ($(DATA),)
SERVE_BUNDLE := .tiergate/demo-bundle
TRAIN_ARGS := --data $(EXAMPLES)/intents.jsonl --rules $(EXAMPLES)/intents_rules.yaml \
	--max-steps 60 --batch-size 16 --learning-rate 3e-4 --target-precision 0.95
TRAIN_INPUTS := $(EXAMPLES)/intents.jsonl $(EXAMPLES)/intents_rules.yaml
else
SERVE_BUNDLE := .tiergate/bundle-$(notdir $(basename $(DATA)))
TRAIN_ARGS := --data $(DATA)
TRAIN_INPUTS := $(DATA)
endif

$(SERVE_BUNDLE)/manifest.json: $(EXT) $(TRAIN_INPUTS)
	rm -rf $(SERVE_BUNDLE)
	$(BIN)/tiergate train $(TRAIN_ARGS) --out $(SERVE_BUNDLE)

serve: $(SERVE_BUNDLE)/manifest.json  ## set up, train a bundle if needed (DATA=... for yours), serve gRPC on 127.0.0.1:50051 on local Ray
	$(BIN)/tiergate serve --bundle $(SERVE_BUNDLE) --address 127.0.0.1:50051

demo: $(EXT)  ## a short tour of the Rust tiers, no server
	$(BIN)/python -m tiergate.demo

test: lint test-rust build stubtest test-python  ## every check CI runs

lint: lint-rust lint-python  ## formatting and lints, Rust and Python

lint-rust: | $(BIN)/python
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

lint-python: $(DEPS) $(PROTO_OUT)
	$(BIN)/ruff check serve tests benchmarks rust_core/fuzz
	$(BIN)/ruff format --check serve tests benchmarks rust_core/fuzz
	$(BIN)/mypy

test-rust:  ## Rust unit tests of the pure core crate
	cargo test -p tiergate-core --locked

stubtest: $(EXT)  ## the .pyi must describe the compiled module
	$(BIN)/python -m mypy.stubtest tiergate._core --allowlist tests/stubtest-allowlist.txt

# Modules that start a Ray driver session run in pytest processes of their own: Ray
# cannot start a second session in one process safely (tests/cluster/conftest.py).
RAY_SESSIONS := tests/cluster/test_ray_stack.py tests/cluster/test_two_nodes.py

# PYTHONFAULTHANDLER: a crash (even at interpreter exit, after the summary) prints
# every thread's Python stack, so a CI log names its culprit.
test-python: $(EXT)  ## pytest against the freshly built extension
	PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest $(addprefix --ignore=,$(RAY_SESSIONS))
	for module in $(RAY_SESSIONS); do PYTHONFAULTHANDLER=1 $(BIN)/python -m pytest $$module || exit 1; done

bench: $(EXT)  ## micro-benchmarks of the Rust tiers next to their baselines
	$(BIN)/python -m benchmarks.micro --json bench-results/micro.json

bench-frontend: $(SERVE_BUNDLE)/manifest.json  ## the gRPC front end next to a bare grpc.aio echo server
	$(BIN)/python -m benchmarks.frontend --bundle $(SERVE_BUNDLE) --json bench-results/frontend.json

bench-model: $(SERVE_BUNDLE)/manifest.json  ## the intent model on Ray Serve next to raw vLLM LLM.classify
	$(BIN)/python -m benchmarks.model_tier --bundle $(SERVE_BUNDLE) --json bench-results/model_tier.json

bench-ingress: $(EXT)  ## ways into tiergate on Ray: our gRPC server, Serve direct ingress, Serve's proxy
	$(BIN)/python -m benchmarks.ray_ingress --json bench-results/ray_ingress.json

bench-load: $(SERVE_BUNDLE)/manifest.json  ## tiergate bench: frontier-only, routing, cascade, hybrid side by side (BENCH_ARGS=...)
	$(BIN)/python -m benchmarks.load --bundle $(SERVE_BUNDLE) --out bench-results/load $(BENCH_ARGS)

bench-quick: $(EXT)  ## the same, under a minute
	$(BIN)/python -m benchmarks.micro --quick --json bench-results/micro-quick.json

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := ann_index_file cache_snapshot rule_file match_text
# AddressSanitizer needs a nightly flag (-Zsanitizer): RUSTC_BOOTSTRAP lets the stable
# toolchain take it, so no nightly install is needed.
FUZZ_RUN = RUSTC_BOOTSTRAP=1 cargo fuzz run
fuzz: $(EXT)  ## coverage-guided fuzzing of the Rust parsers and matchers, FUZZ_SECONDS each (cargo install cargo-fuzz)
	$(BIN)/python rust_core/fuzz/seeds.py rust_core/fuzz/corpus
	for t in $(FUZZ_TARGETS); do \
		$(FUZZ_RUN) --fuzz-dir rust_core/fuzz $$t rust_core/fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 || exit 1; \
	done

fmt:  ## format Rust and Python in place
	cargo fmt --all
	$(BIN)/ruff format serve tests benchmarks rust_core/fuzz
	$(BIN)/ruff check --fix serve tests benchmarks rust_core/fuzz

clean:
	rm -rf $(VENV) target bench-results .tiergate
