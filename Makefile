# ephemerald — common tasks. `make demo` and `make test` need root on Debian 12
# (they install and start containerd); see README.md. The workspace holds the
# agent (the root package `ephemerald`) and the lab (`testbed/`, the package
# `ephemerald-testbed` with the binary of `demo`, `bench`, `testbed up|down`).

CARGO ?= cargo
DEMO_ARGS ?=
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: deps build demo test lint unit bench clean-testbeds

deps:
	scripts/install-deps.sh
	scripts/install-kubectl.sh

# The agent alone, as deployed (target/release/ephemerald).
build:
	$(CARGO) build --release -p ephemerald

demo: deps
	$(CARGO) run --release --quiet -p ephemerald-testbed -- demo $(DEMO_ARGS)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Every test of both crates, including the ones against real containerd and
# the real kubectl.
test: deps lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

# Only the pure and component tests (no root, no containerd).
unit:
	$(CARGO) test --workspace --lib

# The benchmark harness on a release build: prints the tables and writes
# bench/results.json (see BENCHMARKS.md). BENCH_ARGS=--quick for a fast look.
BENCH_ARGS ?=
# The agent is built on its own first, so the binary measured is the one
# `make build` and the image ship (features not unified with the lab's).
bench: deps
	$(CARGO) build --release -p ephemerald
	$(CARGO) build --release -p ephemerald-testbed
	./target/release/ephemerald-testbed bench --out bench/results.json $(BENCH_ARGS)

clean-testbeds:
	scripts/testbed.sh status
