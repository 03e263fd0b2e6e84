# kube-sts — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help build crds check-crds chart-check up down demo test test-unit test-e2e bench image docker-image release lint clean-e2e

help:
	@echo "make demo    build, start the local control plane and STS, run the operator on a sample binding"
	@echo "make test    unit tests, then the end-to-end suite against the real control plane and STS peer"
	@echo "make up      start the local control plane, node and STS peer (idempotent); make down stops them"
	@echo "make image   build the operator's OCI image with no container engine (docker-image: with Docker)"
	@echo "make bench   benchmarks (figures printed, not asserted)"
	@echo "make crds    regenerate crds/ from the Rust types"

build:
	$(CARGO) build --locked

crds:
	$(CARGO) run --quiet --locked -- crd > crds/kube-sts.yaml
	cp crds/kube-sts.yaml charts/kube-sts/crds/kube-sts.yaml

check-crds:
	@diff -u crds/kube-sts.yaml <($(CARGO) run --quiet --locked -- crd) && echo "crds/ matches kube-sts crd"
	@diff -u crds/kube-sts.yaml charts/kube-sts/crds/kube-sts.yaml && echo "charts/kube-sts/crds matches crds/"

up:
	bash e2e/scripts/up.sh

down:
	bash e2e/scripts/down.sh

demo:
	bash e2e/scripts/demo.sh

test: test-unit release test-e2e

chart-check:
	bash e2e/scripts/chart-check.sh

test-unit: check-crds
	$(CARGO) test --locked --lib --bins

test-e2e:
	bash e2e/scripts/test-e2e.sh

bench:
	bash e2e/scripts/bench.sh

# The operator's image as an OCI archive in the cache, no container engine needed
# (e2e/scripts/build-image.sh); prints its reference and path.
image:
	bash e2e/scripts/build-image.sh

# The same image from the Dockerfile, for those with a Docker engine.
docker-image:
	@docker info >/dev/null 2>&1 || { echo "make docker-image needs a running Docker engine" >&2; exit 1; }
	docker build -t kube-sts:$$($(CARGO) run --quiet --locked -- version | cut -d' ' -f2) .

# The release binary, linked statically (glibc, crt-static) as `make image` ships it.
release:
	@bin=$$(bash e2e/scripts/build-image.sh --binary) && echo "$$bin" && "$$bin" version && \
	  "$$bin" crd | diff -q - crds/kube-sts.yaml && echo "release binary: crd matches crds/"

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

clean-e2e: down
	rm -rf .e2e
