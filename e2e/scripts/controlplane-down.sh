#!/usr/bin/env bash
# Stops the local control plane started by controlplane-up.sh: SIGTERM, wait,
# then SIGKILL. No error when it is not running. Keeps its state (etcd data,
# pki) for the next start; `rm -rf .e2e` wipes everything.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
E2E="$REPO/.e2e"
STATE="$E2E/controlplane"
PIDFILE="$E2E/run/controlplane.pid"
WAIT="${KUBE_STS_CP_STOP_TIMEOUT:-40}"

log() { echo "controlplane-down: $*" >&2; }

if [[ ! -f "$PIDFILE" ]]; then
	log "not running (no pid file)"
	exit 0
fi
pid=$(cat "$PIDFILE" 2>/dev/null || true)
if [[ ! "$pid" =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null ||
	! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--dir $STATE"; then
	log "not running (stale pid file)"
	rm -f "$PIDFILE"
	exit 0
fi

log "stopping pid $pid"
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 1 $((WAIT * 4))); do
	kill -0 "$pid" 2>/dev/null || break
	sleep 0.25
done
if kill -0 "$pid" 2>/dev/null; then
	log "still running after ${WAIT}s: SIGKILL"
	kill -KILL "$pid" 2>/dev/null || true
	for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
fi
rm -f "$PIDFILE"
log "stopped"
