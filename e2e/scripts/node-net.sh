#!/usr/bin/env bash
# The node's network: a network namespace of its own joined to the host by a
# veth pair. Everything else of the node's networking (the pod bridge, CNI's
# and kube-proxy's netfilter rules, pod namespaces) lives inside that
# namespace, so the host's own tables are never touched.
#
#   node-net.sh up     create (idempotent) and record what was created in .e2e/run/node.names
#   node-net.sh down   remove exactly what is recorded there (and the names of this instance),
#                      unless the link names another checkout as its owner
#   node-net.sh check  exit 0 when the network is up as configured
#
# On the host this adds: /run/netns/kubests-<id>, the link kubests<id> with
# <subnet>.1/30, and a route to the pod range via the node (so that no reply
# to a pod address ever takes the host's default route). The host's
# ip_forward is left as it is (off here): the host does not route for pods.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=node-env.sh
. "$SCRIPT_DIR/node-env.sh"
log() { echo "node-net: $*" >&2; }
in_ns() { nsenter --net="/run/netns/$NODE_NETNS" -- "$@"; }

check() {
	[[ -e "/run/netns/$NODE_NETNS" ]] || return 1
	ip -o -4 addr show dev "$NODE_VETH" 2>/dev/null | grep -qF " $HOST_ADDR/30 " || return 1
	ip link show dev "$NODE_VETH" 2>/dev/null | grep -q 'state UP' || return 1
	in_ns ip -o -4 addr show dev kubests-link 2>/dev/null | grep -qF " $NODE_ADDR/30 " || return 1
	ip route show "$POD_CIDR" 2>/dev/null | grep -qF "via $NODE_ADDR dev $NODE_VETH" || return 1
	[[ "$(in_ns cat /proc/sys/net/ipv4/ip_forward)" == 1 ]] || return 1
}

down() {
	if node_foreign; then
		log "$NODE_NETNS belongs to $(node_owner), not to this checkout: left alone"
		return 0
	fi
	local netns="$NODE_NETNS" veth="$NODE_VETH"
	if [[ -f "$NODE_NAMES" ]]; then
		# shellcheck disable=SC1090
		. "$NODE_NAMES" # netns=... veth=... as created
	fi
	if [[ -e "/run/netns/$netns" ]]; then
		ip netns delete "$netns" && log "removed network namespace $netns"
	fi
	if ip link show dev "$veth" >/dev/null 2>&1; then
		ip link delete dev "$veth" && log "removed link $veth"
	fi
	rm -f "$NODE_NAMES"
}

overlaps() { # does the host already use addresses of NODE_SUBNET? (ours are removed by then)
	{ ip -o -4 addr show | awk '{ print $4 }'; ip -4 route show | awk '{ print $1 }'; } |
		awk -v p="$NODE_NET_PREFIX." 'index($0, p) == 1 { found = 1 } END { exit !found }'
}

up() {
	if node_foreign; then
		log "$NODE_NETNS (the node of apiserver port $NODE_ID) belongs to another checkout: $(node_owner); give this one other ports (KUBE_STS_APISERVER_PORT, ...)"
		exit 1
	fi
	if check; then
		log "reusing $NODE_NETNS ($HOST_ADDR <-> $NODE_ADDR, pods $POD_CIDR)"
		return 0
	fi
	command -v ip >/dev/null && command -v nsenter >/dev/null || { log "ip (iproute2) and nsenter (util-linux) are needed"; exit 1; }
	down
	if overlaps; then
		log "the host already uses addresses in $NODE_SUBNET; choose another KUBE_STS_NODE_SUBNET"
		exit 1
	fi
	mkdir -p "$(dirname "$NODE_NAMES")"
	printf 'netns=%q\nveth=%q\n' "$NODE_NETNS" "$NODE_VETH" >"$NODE_NAMES"
	ip netns add "$NODE_NETNS"
	ip link add "$NODE_VETH" type veth peer name kubests-link netns "$NODE_NETNS"
	# Both ends name their owner (node-env.sh: node_owner), so that no other checkout
	# using the same port ever removes them.
	ip link set "$NODE_VETH" alias "$NODE_E2E"
	in_ns ip link set kubests-link alias "$NODE_E2E"
	ip addr add "$HOST_ADDR/30" dev "$NODE_VETH"
	ip link set "$NODE_VETH" up
	in_ns ip link set lo up
	in_ns ip addr add "$NODE_ADDR/30" dev kubests-link
	in_ns ip link set kubests-link up
	in_ns ip route add default via "$HOST_ADDR"
	ip route add "$POD_CIDR" via "$NODE_ADDR" dev "$NODE_VETH"
	# Inside the node's namespace only (these are per network namespace).
	in_ns sysctl -qw net.ipv4.ip_forward=1
	in_ns sysctl -qw net.ipv4.conf.all.route_localnet=0
	check || { log "network did not come up as configured"; down; exit 1; }
	log "created $NODE_NETNS: host $NODE_VETH $HOST_ADDR/30 <-> node kubests-link $NODE_ADDR/30, pods $POD_CIDR"
}

case "${1:-}" in
up) up ;;
down) down ;;
check) check ;;
*) echo "usage: node-net.sh up|down|check" >&2; exit 2 ;;
esac
