#!/usr/bin/env bash
# Starts the local control plane (embedded etcd + kube-apiserver +
# kube-controller-manager in one process) unless it already runs and is ready.
# Idempotent. State lives in $REPO/.e2e/:
#   .e2e/controlplane/           state dir (etcd data, pki, kubeconfig)
#   .e2e/logs/controlplane.log   its log (the previous one: controlplane.log.1)
#   .e2e/run/controlplane.pid    pid file
#   .e2e/kubeconfig              admin kubeconfig, context kube-sts-e2e
# Prints the kubeconfig path as the last line on stdout.
#
#   KUBE_STS_APISERVER_PORT   (16443)  KUBE_STS_ETCD_CLIENT_PORT (12379)
#   KUBE_STS_ETCD_PEER_PORT   (12380)  KUBE_STS_CP_TIMEOUT       (120 s)
#   KUBE_STS_CONTROLPLANE_BIN  use this binary instead of build-controlplane.sh
# With the node (KUBE_STS_NODE=1, the default; see node-env.sh) the control
# plane also gets --node-name/--node-address/--host-address: the node link
# (node-net.sh up) must exist first, as the apiserver is reached there too.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
E2E="$REPO/.e2e"
STATE="$E2E/controlplane"
LOG="$E2E/logs/controlplane.log"
PIDFILE="$E2E/run/controlplane.pid"
STARTING="$E2E/run/controlplane.starting" # exists while a start has not become ready
KUBECONFIG_OUT="$E2E/kubeconfig"
APISERVER_PORT="${KUBE_STS_APISERVER_PORT:-16443}"
ETCD_CLIENT_PORT="${KUBE_STS_ETCD_CLIENT_PORT:-12379}"
ETCD_PEER_PORT="${KUBE_STS_ETCD_PEER_PORT:-12380}"
TIMEOUT="${KUBE_STS_CP_TIMEOUT:-120}"
# shellcheck source=node-env.sh
. "$SCRIPT_DIR/node-env.sh"
NODE_ARGS=()
if [[ "$NODE_ENABLED" == 1 ]]; then
	NODE_ARGS=(--node-name "$NODE_NAME" --node-address "$NODE_ADDR" --host-address "$HOST_ADDR")
fi

log() { echo "controlplane-up: $*" >&2; }

command -v kubectl >/dev/null 2>&1 || { log "kubectl not found in PATH"; exit 1; }

# The pid from the pid file, if that process is alive and is our control plane.
running_pid() {
	[[ -f "$PIDFILE" ]] || return 1
	local pid
	pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
	[[ "$pid" =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	# Guard against a recycled pid: the command line must name our state dir.
	local cmdline
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	grep -qF -- "--dir $STATE " <<<"$cmdline" || return 1
	echo "$pid"
}

ready() { # ready KUBECONFIG
	[[ -f "$1" ]] || return 1
	[[ "$(kubectl --kubeconfig "$1" --request-timeout=5s get --raw /readyz 2>/dev/null)" == ok ]]
}

# Started with the node settings asked for now?
same_node_args() {
	local cmdline
	cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
	if ((${#NODE_ARGS[@]})); then
		grep -qF -- "${NODE_ARGS[*]}" <<<"$cmdline"
	else
		! grep -qF -- "--node-name" <<<"$cmdline"
	fi
}

if pid=$(running_pid) && same_node_args "$pid" && ready "$KUBECONFIG_OUT"; then
	log "reusing running control plane (pid $pid)"
	echo "$KUBECONFIG_OUT"
	exit 0
fi

# Stop a stale process named by the pid file.
if pid=$(running_pid); then
	log "stopping stale control plane (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
	kill -KILL "$pid" 2>/dev/null || true
	for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
fi
rm -f "$PIDFILE"

# A port still taken means some other process holds it: say so instead of
# starting something that cannot bind.
for port in "$APISERVER_PORT" "$ETCD_CLIENT_PORT" "$ETCD_PEER_PORT"; do
	if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
		log "port 127.0.0.1:$port is already in use by another process; stop it or choose other ports"
		exit 1
	fi
done

BIN="${KUBE_STS_CONTROLPLANE_BIN:-}"
if [[ -z "$BIN" ]]; then
	BIN=$("$SCRIPT_DIR/build-controlplane.sh" | tail -n 1)
fi
[[ -x "$BIN" ]] || { log "control-plane binary not found: $BIN"; exit 1; }

mkdir -p "$STATE" "$(dirname "$LOG")" "$(dirname "$PIDFILE")"
# etcd data from a start that never became ready may be half-initialised.
if [[ -e "$STARTING" && -d "$STATE/etcd" ]]; then
	log "previous start never became ready: removing its etcd data"
	rm -rf "$STATE/etcd"
fi
touch "$STARTING"
[[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"

log "starting $BIN"
start_ms=$(($(date +%s%N) / 1000000))
setsid nohup "$BIN" --dir "$STATE" \
	--apiserver-port "$APISERVER_PORT" \
	--etcd-client-port "$ETCD_CLIENT_PORT" \
	--etcd-peer-port "$ETCD_PEER_PORT" \
	"${NODE_ARGS[@]}" \
	</dev/null >>"$LOG" 2>&1 &
pid=$!
echo "$pid" >"$PIDFILE"

fail() {
	log "$1"
	echo "----- last 60 lines of $LOG -----" >&2
	tail -n 60 "$LOG" >&2 || true
	# Leave nothing half-started behind.
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$PIDFILE"
	exit 1
}

deadline=$(($(date +%s) + TIMEOUT))
state_kubeconfig="$STATE/kubeconfig"
phase="kube-apiserver /readyz"
while :; do
	kill -0 "$pid" 2>/dev/null || fail "control plane (pid $pid) exited during start-up"
	if [[ "$phase" == "kube-apiserver /readyz" ]] && ready "$state_kubeconfig"; then
		phase="ServiceAccount default/default"
	fi
	if [[ "$phase" == "ServiceAccount default/default" ]] &&
		kubectl --kubeconfig "$state_kubeconfig" --request-timeout=5s -n default get serviceaccount default >/dev/null 2>&1; then
		break
	fi
	(($(date +%s) < deadline)) || fail "not ready after ${TIMEOUT}s (waiting for $phase)"
	sleep 0.5
done

cp -f "$state_kubeconfig" "$KUBECONFIG_OUT.tmp"
chmod 600 "$KUBECONFIG_OUT.tmp"
mv -f "$KUBECONFIG_OUT.tmp" "$KUBECONFIG_OUT"
rm -f "$STARTING"
elapsed_ms=$(($(date +%s%N) / 1000000 - start_ms))
log "ready in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s (pid $pid, https://127.0.0.1:$APISERVER_PORT); export KUBECONFIG=$KUBECONFIG_OUT"
echo "$KUBECONFIG_OUT"
