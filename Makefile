# grad: see README.md. `make demo` runs grad end to end; `make test` is what CI runs.

CARGO ?= cargo

.PHONY: build test demo bench lint fmt clean

build:
	$(CARGO) build --workspace --bins

# The end-to-end tests start the real binaries, so build them first; then
# they run again with grad on PostgreSQL (a throwaway server).
test: build
	$(CARGO) test --workspace
	bash scripts/with_postgres.sh $(CARGO) test -p grad-tests

demo: build
	bash scripts/demo.sh

bench:
	$(CARGO) build --release --workspace --bins
	bash scripts/bench.sh
	bash scripts/bench_sync.sh
	bash scripts/bench_datasets.sh
	target/release/grad-bench-jobs 2> target/bench-jobs.log
	target/release/grad-bench-replicas 2> target/bench-replicas.log

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
