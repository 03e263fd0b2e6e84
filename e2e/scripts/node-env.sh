# Sourced by the node scripts (node-net.sh, node-up.sh, node-down.sh) and by
# controlplane-up.sh: the names and addresses of this checkout's node. Every
# name carries the instance id (the apiserver port), so two checkouts on one
# machine (with different ports) never share a namespace, link or cgroup.
#
#   KUBE_STS_NODE              1 (default): run a node; 0: control plane only
#   KUBE_STS_APISERVER_PORT    16443; also the instance id
#   KUBE_STS_NODE_SUBNET       a /24 of the node link and the pod network,
#                              default 10.213.<port % 256>.0/24:
#                                .1/30 the host's end of the link (apiserver, STS peer)
#                                .2/30 the node (kubelet's InternalIP)
#                                .128/25 pods (bridge kubests0, gateway .129)
#   KUBE_STS_NODE_NAME         kube-sts-node
#   KUBE_STS_KUBELET_PORT      10250 (inside the node's network namespace)
#   KUBE_STS_KUBELET_SYNC      10s: the kubelet's syncFrequency, which paces how
#                              soon a changed Secret reaches mounted volumes
#                              (upstream default 1m)
# shellcheck shell=bash
NODE_REPO=${NODE_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
NODE_ENABLED="${KUBE_STS_NODE:-1}"
NODE_ID="${KUBE_STS_APISERVER_PORT:-16443}"
[[ "$NODE_ID" =~ ^[0-9]+$ ]] || { echo "node-env: bad KUBE_STS_APISERVER_PORT '$NODE_ID'" >&2; return 1; }
NODE_SUBNET="${KUBE_STS_NODE_SUBNET:-10.213.$((NODE_ID % 256)).0/24}"
if [[ ! "$NODE_SUBNET" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)\.0/24$ ]]; then
	echo "node-env: KUBE_STS_NODE_SUBNET must be an IPv4 a.b.c.0/24, got '$NODE_SUBNET'" >&2
	return 1
fi
NODE_NET_PREFIX="${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}"
HOST_ADDR="$NODE_NET_PREFIX.1"
NODE_ADDR="$NODE_NET_PREFIX.2"
POD_CIDR="$NODE_NET_PREFIX.128/25"
POD_GW="$NODE_NET_PREFIX.129"
SERVICE_CIDR="10.0.0.0/24" # the apiserver's --service-cluster-ip-range
NODE_NAME="${KUBE_STS_NODE_NAME:-kube-sts-node}"
KUBELET_PORT="${KUBE_STS_KUBELET_PORT:-10250}"
KUBELET_SYNC="${KUBE_STS_KUBELET_SYNC:-10s}"

NODE_NETNS="kubests-$NODE_ID"   # the node's network namespace (/run/netns/...)
NODE_VETH="kubests$NODE_ID"     # host end of the node link (the node end is kubests-link)
NODE_BRIDGE="kubests0"          # pod bridge, inside the node's namespace
NODE_CGROUP="kubests-$NODE_ID"  # kubelet's cgroupRoot, in every hierarchy

NODE_E2E="$NODE_REPO/.e2e"
NODE_DIR="$NODE_E2E/node"       # everything the node writes (wiped by each start)
NODE_SOCK="$NODE_DIR/containerd.sock"
NODE_PIDFILE="$NODE_E2E/run/node.pid"
NODE_NAMES="$NODE_E2E/run/node.names" # what node-net.sh created, for node-down.sh
NODE_CACHE="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"

# Who owns this instance's node: both ends of the node link carry the owning
# checkout's .e2e path as their alias (set by node-net.sh). Prints it; empty
# when there is no such network.
node_owner() {
	local alias=""
	if [[ -e "/run/netns/$NODE_NETNS" ]]; then
		alias=$(ip -n "$NODE_NETNS" -o link show kubests-link 2>/dev/null | sed -n 's/.* alias \(.*\)$/\1/p')
	fi
	if [[ -z "$alias" ]] && ip link show dev "$NODE_VETH" >/dev/null 2>&1; then
		alias=$(cat "/sys/class/net/$NODE_VETH/ifalias" 2>/dev/null) || true
	fi
	echo "$alias"
}

# node_foreign: the instance's network exists and belongs to another checkout
# (same apiserver port): then nothing of it may be touched from here.
node_foreign() {
	local owner
	owner=$(node_owner)
	[[ -n "$owner" && "$owner" != "$NODE_E2E" ]]
}
