#!/usr/bin/env bash
# The end-to-end suite: starts the environment unless it already runs (and then stops it
# again at the end), installs the CRDs, and runs tests/e2e against it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

running() {
  [ -f .e2e/run/controlplane.pid ] && kill -0 "$(cat .e2e/run/controlplane.pid)" 2>/dev/null &&
  [ -f .e2e/run/moto.pid ] && kill -0 "$(cat .e2e/run/moto.pid)" 2>/dev/null
}
started=0
if ! running; then started=1; fi
cleanup() { if [ "$started" = 1 ]; then bash "$here/down.sh" >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

# Build the test binaries while the environment starts.
cargo test --locked --test e2e --no-run 2>&1 | tail -n 2 &
build_pid=$!
bash "$here/up.sh"
wait "$build_pid"

kubectl --kubeconfig .e2e/kubeconfig apply --server-side -f crds/ >/dev/null
kubectl --kubeconfig .e2e/kubeconfig wait --for=condition=Established --timeout=60s \
  crd/awsrolebindings.kube-sts.io crd/awsrolegrants.kube-sts.io >/dev/null

# The chart: lint, render with several value sets, server-side dry run.
bash "$here/chart-check.sh"

# Tests wait on the apiserver and STS, not the CPU: run many at once.
cargo test --locked --test e2e -- --test-threads="${E2E_THREADS:-16}"
