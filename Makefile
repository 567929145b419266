# millrace: set-up, run, test, bench. RocksDB is Debian's system library
# (see BUILD notes in README.md); these variables make librocksdb-sys link it.
export ROCKSDB_LIB_DIR ?= /usr/lib/x86_64-linux-gnu
export ROCKSDB_INCLUDE_DIR ?= /usr/include
export SNAPPY_LIB_DIR ?= /usr/lib/x86_64-linux-gnu
export ROCKSDB_STATIC ?= 1

# chromium: the status page is tested in a real (headless) browser.
APT_PACKAGES := librocksdb-dev libclang-dev prometheus chromium

.PHONY: setup build run test bench bench-quick lint fuzz

## Install what a fresh Debian machine lacks (needs root when something is missing).
setup:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: setup
	cargo build --bins

## Run the example: the streaming word count over a bundled text.
run: build
	rm -rf target/wordcount
	cargo run -q --bin millrace -- run examples/wordcount.toml --http off
	@echo "--- final count per word (target/wordcount/counts.jsonl) ---"
	@awk -F'\t' '{c[$$1]=$$2} END {for (w in c) print c[w] "\t" w}' target/wordcount/counts.jsonl | sort -k1,1nr -k2 | head -15

## Unit, integration and doc tests.
test: setup
	cargo build --bins --examples
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast; \
	fi
	cargo test --workspace --doc

## Benchmarks: the end-to-end harness (release) and criterion micro-benchmarks.
bench: setup
	cargo bench --bench e2e
	cargo bench --bench micro

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## Fuzz the cluster frame decoder for 60 s (nightly toolchain and cargo-fuzz).
fuzz:
	cd fuzz && cargo +nightly fuzz run frame_decoder -- -max_total_time=60
