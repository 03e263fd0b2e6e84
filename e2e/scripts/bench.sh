#!/usr/bin/env bash
# make bench: starts the environment if needed (as `make up`), installs the CRDs, builds
# kube-sts and the bench driver (examples/bench.rs) with --release, runs the driver and
# prints its table. Figures are printed, never asserted. The environment keeps running.
#
# Env: BENCH_BINDINGS (1000), BENCH_LARGE (10000), BENCH_NOISE_SECRETS (20000),
#      BENCH_REST_SECONDS (600), BENCH_CONCURRENCY (32), BENCH_BUDGET_SECONDS (1560),
#      BENCH_RESERVE_SECONDS (180); see examples/bench.rs. A full run takes about 35 minutes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"
export KUBECONFIG="$repo/.e2e/kubeconfig"
part_of="app.kubernetes.io/part-of=kube-sts-bench"

step() { printf '\n==> %s\n' "$*" >&2; }

# Whatever a failed or interrupted run left behind (the driver deletes its own on success).
leftovers() {
  kubectl delete awsrolegrants.kube-sts.io,clusterrolebindings,clusterroles,flowschemas.flowcontrol.apiserver.k8s.io \
    -l "$part_of" \
    --ignore-not-found --wait=false >/dev/null 2>&1 || true
  kubectl delete namespaces -l "$part_of" --ignore-not-found --wait=false >/dev/null 2>&1 || true
}

# A running environment is used as it is. (The up scripts know their processes by this
# checkout's path, so a worktree that shares another checkout's .e2e through a symlink must
# not run them: they would take the other checkout's pid files for stale ones.)
env_running() {
  [[ -f .e2e/aws.env && -f .e2e/kubeconfig ]] || return 1
  [[ "$(kubectl --request-timeout=5s get --raw /readyz 2>/dev/null)" == ok ]] || return 1
  local sts
  sts="$(sed -n 's|^AWS_ENDPOINT_URL_STS=http://||p' .e2e/aws.env)"
  sts="${sts%%/*}"
  [[ -n "$sts" ]] && (exec 3<>"/dev/tcp/${sts%%:*}/${sts##*:}") 2>/dev/null
}

step "Building kube-sts and the bench driver (release) while the environment starts"
build_log="$(mktemp)"
cargo build --release --locked --bin kube-sts --example bench >"$build_log" 2>&1 &
build_pid=$!
if env_running; then
  echo "bench: using the running control plane and STS peer" >&2
else
  bash "$here/up.sh"
fi
if ! wait "$build_pid"; then
  cat "$build_log" >&2
  rm -f "$build_log"
  exit 1
fi
tail -n 1 "$build_log" >&2
rm -f "$build_log"

kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/awsrolebindings.kube-sts.io crd/awsrolegrants.kube-sts.io >/dev/null
leftovers
trap leftovers EXIT

mem_gib="$(awk '/^MemTotal:/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)"
cpu="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
machine="$(nproc) CPUs (${cpu:-unknown model}), ${mem_gib} GiB memory, $(uname -sr)"
step "Running the bench on $machine"
mkdir -p .e2e/bench
results=".e2e/bench/results-$(date +%Y%m%dT%H%M%S).tsv"
BENCH_RESULTS="$results" "${CARGO_TARGET_DIR:-target}/release/examples/bench"

printf '\nmachine: %s\n' "$machine"
printf 'results: %s; operator logs: .e2e/logs/bench-*-operator-*.log\n' "$results"

# Leave the control plane as it was found: wait until the namespace controller and the
# garbage collector have removed everything the bench created (minutes at 10,000
# bindings), so that a `make test` right after does not queue behind them.
step "Waiting for the bench's namespaces to be gone"
kubectl wait --for=delete namespaces -l "$part_of" --timeout=900s >/dev/null 2>&1 || true
