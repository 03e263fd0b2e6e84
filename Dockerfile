# Container image of kube-sts: a static (musl) binary on a distroless base.
#
# Base images are build arguments. They are written here as plain repository
# names with no registry host, so point them at the registry or mirror you pull
# from, e.g.
#
#   docker build \
#     --build-arg RUST_IMAGE=<registry>/rust:1-bookworm \
#     --build-arg RUNTIME_IMAGE=<registry>/distroless/static-debian12:nonroot \
#     -t kube-sts:0.1.0 .
#
# RUNTIME_IMAGE in particular is published by the distroless project on its own
# registry, not on the default one Docker assumes for a bare name. Any static
# base with a nonroot user works if it has the system CA bundle
# (/etc/ssl/certs/ca-certificates.crt, which distroless static ships): the
# binary needs no libc or shell, but its TLS to AWS trusts the system roots.
#
# The builder stage runs on the target platform and builds for
# <uname -m>-unknown-linux-musl, i.e. x86_64-unknown-linux-musl on amd64 and
# aarch64-unknown-linux-musl on arm64 builders.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
# musl-tools: musl-gcc for the C parts (aws-lc-sys, ring); cmake: aws-lc-sys's
# fallback build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake \
 && rm -rf /var/lib/apt/lists/*
RUN rustup target add "$(uname -m)-unknown-linux-musl"
# C code of the target (not of build scripts) is compiled against musl.
ENV TARGET_CC=musl-gcc
WORKDIR /src

# Dependencies first, against stub sources, so that a source change does not
# rebuild them (plain layer caching; no BuildKit-only features are needed).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" \
 && rm -rf src

COPY src ./src
# COPY keeps the context's modification times, which may be older than the stub
# build: touch so cargo rebuilds the crate itself.
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked --target "$(uname -m)-unknown-linux-musl" \
 && cp "target/$(uname -m)-unknown-linux-musl/release/kube-sts" /kube-sts \
 && /kube-sts version

FROM ${RUNTIME_IMAGE}
COPY --from=builder /kube-sts /kube-sts
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/kube-sts"]
CMD ["run"]
