# ephemerald — common tasks. `make demo` and `make test` need root on Debian 12
# (they install and start containerd); see README.md.

CARGO ?= cargo
DEMO_ARGS ?=
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: deps build demo test lint unit bench clean-testbeds

deps:
	scripts/install-deps.sh
	scripts/install-kubectl.sh

build:
	$(CARGO) build --release

demo: deps
	$(CARGO) run --release --quiet -- demo $(DEMO_ARGS)

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# Every test, including the ones against real containerd and the real kubectl.
test: deps lint
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi

# Only the pure and component tests (no root, no containerd).
unit:
	$(CARGO) test --lib

# The benchmark harness on a release build: prints the tables and writes
# bench/results.json (see BENCHMARKS.md). BENCH_ARGS=--quick for a fast look.
BENCH_ARGS ?=
bench: deps
	$(CARGO) build --release
	./target/release/ephemerald bench --out bench/results.json $(BENCH_ARGS)

clean-testbeds:
	scripts/testbed.sh status
