#!/usr/bin/env bash
# Stops the local node and removes everything it created, whatever state an
# earlier run left it in (a killed supervisor, a half-started node):
#   1. the supervisor (SIGTERM: kubelet and kube-proxy, then containerd);
#   2. every process still in the node's network namespace (containerd,
#      shims) and in the kubelet's cgroups (containers), with SIGKILL;
#   3. the cgroups under the node's cgroupRoot, in every hierarchy;
#   4. the network (node-net.sh down): the namespace, and with it the pod
#      bridge, the pod namespaces and every netfilter rule of CNI and
#      kube-proxy; the veth link and its route (unless --keep-network);
#   5. any mount under .e2e/ still in the host's mount table (the node mounts
#      only in its own mount namespace, which is gone once its processes are).
# The node's files under .e2e/node stay for inspection until the next start.
set -uo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=node-env.sh
. "$SCRIPT_DIR/node-env.sh"
log() { echo "node-down: $*" >&2; }
[[ "$NODE_CGROUP" =~ ^kubests-[0-9]+$ && "$NODE_NETNS" =~ ^kubests-[0-9]+$ ]] || { log "bad node names"; exit 1; }
keep_network=0
[[ "${1:-}" == --keep-network ]] && keep_network=1
# Another checkout with the same apiserver port runs this instance's node: touch nothing.
if node_foreign; then
	log "the node $NODE_NETNS belongs to $(node_owner), not to this checkout: left alone"
	exit 0
fi

# 1. The supervisor.
if [[ -f "$NODE_PIDFILE" ]]; then
	pid=$(cat "$NODE_PIDFILE" 2>/dev/null || true)
	if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
		tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "node-run.sh"; then
		log "stopping the node (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for _ in $(seq 1 160); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$NODE_PIDFILE"
fi

cgroup_dirs() { # every hierarchy's directory of the node's cgroupRoot
	local h
	for h in /sys/fs/cgroup/*/; do
		[[ -d "$h$NODE_CGROUP" ]] && echo "$h$NODE_CGROUP"
	done
}
node_pids() {
	[[ -e "/run/netns/$NODE_NETNS" ]] && ip netns pids "$NODE_NETNS" 2>/dev/null
	local d
	for d in $(cgroup_dirs); do
		find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null
	done
}

# 2. Leftover processes: SIGKILL until none is left.
killed=0
for _ in $(seq 1 40); do
	left=$(node_pids | sort -u | tr '\n' ' ')
	[[ -n "${left// /}" ]] || break
	# shellcheck disable=SC2086
	kill -KILL $left 2>/dev/null || true
	killed=1
	sleep 0.25
done
left=$(node_pids | sort -u | tr '\n' ' ')
[[ -z "${left// /}" ]] || log "processes still alive after SIGKILL: $left"
((killed)) && log "killed the node's leftover processes"

# 3. Cgroups, deepest first.
for d in $(cgroup_dirs); do
	find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
	[[ -d "$d" ]] && log "could not remove cgroup $d"
done

# 4. Network.
if ((keep_network == 0)); then
	bash "$SCRIPT_DIR/node-net.sh" down
fi

# 5. Mounts under .e2e in the host's mount namespace (none are expected).
awk -v base="$NODE_E2E/" 'index($5, base) == 1 { print $5 }' /proc/self/mountinfo | sort -r | while read -r m; do
	umount -l "$m" && log "unmounted $m"
done
exit 0
