# grad: see README.md. `make demo` runs grad end to end; `make test` is what CI runs.

CARGO ?= cargo

.PHONY: build test demo bench lint fmt clean dev images validate-manifests

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

# Kubernetes (k8s/, runner-image/, skaffold.yaml): grad on minikube with hot
# reload. The eval shares the recipe line with skaffold so that the images are
# built in minikube's docker, where the pods find them.
dev:
	minikube start --cpus=4 --memory=16384
	eval $$(minikube docker-env) && skaffold dev -p development --port-forward

# Both images, into the current docker (for minikube's: eval $$(minikube docker-env) first).
images:
	DOCKER_BUILDKIT=1 docker build -f runner-image/grad.Dockerfile -t grad:dev .
	DOCKER_BUILDKIT=1 docker build -f runner-image/Dockerfile -t grad-runner:dev .

validate-manifests:
	bash scripts/validate_manifests.sh
