#!/usr/bin/env bash
# Starts the local node (idempotent): containerd 2.x with runc and CNI
# (bridge + host-local + loopback), the kubelet and kube-proxy (nftables mode),
# inside the node's own network namespace (node-net.sh) and a private mount
# namespace (node-run.sh). Needs the control plane running with the node's
# flags (controlplane-up.sh passes them). A running node whose Node object is
# Ready is reused; otherwise whatever is left of an earlier node is removed
# (node-down.sh) and a clean one starts: containerd's state, the kubelet's
# directory and the pod network are new on every start (the cluster's state
# in etcd is kept).
#
# Written under .e2e/: node/ (configs, containerd root and state, kubelet root,
# pod logs), logs/{node,containerd,kubelet,kube-proxy}.log, run/node.pid.
#   KUBE_STS_NODE_TIMEOUT  seconds to wait for the Node to be Ready (default 180)
#   KUBE_STS_NODE_V        klog verbosity of the kubelet and kube-proxy (default 1)
# and the variables of node-env.sh.
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=node-env.sh
. "$SCRIPT_DIR/node-env.sh"
log() { echo "node-up: $*" >&2; }
TIMEOUT="${KUBE_STS_NODE_TIMEOUT:-180}"
KUBECONFIG_ADMIN="$NODE_E2E/kubeconfig"
LOG="$NODE_E2E/logs/node.log"
kc() { kubectl --kubeconfig "$KUBECONFIG_ADMIN" --request-timeout=10s "$@"; }

[[ "$(id -u)" == 0 ]] || { log "the node needs root (namespaces, mounts, cgroups)"; exit 1; }
for tool in runc nft iptables conntrack nsenter unshare mount; do
	command -v "$tool" >/dev/null || { log "$tool not found; run e2e/scripts/install-prereqs.sh"; exit 1; }
done
for plugin in bridge host-local loopback; do
	[[ -x "/usr/lib/cni/$plugin" ]] || { log "/usr/lib/cni/$plugin not found (containernetworking-plugins); run e2e/scripts/install-prereqs.sh"; exit 1; }
done
[[ -f /sys/fs/cgroup/memory/memory.limit_in_bytes || -f /sys/fs/cgroup/cgroup.controllers ]] ||
	{ log "no cgroup hierarchy found under /sys/fs/cgroup"; exit 1; }

supervisor_pid() {
	[[ -f "$NODE_PIDFILE" ]] || return 1
	local pid
	pid=$(cat "$NODE_PIDFILE" 2>/dev/null) || return 1
	[[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "node-run.sh" || return 1
	echo "$pid"
}

# node_ready [SINCE]: the Node is Ready, by a heartbeat at or after SINCE
# (RFC 3339, UTC) when given: a Node object left from an earlier run still
# says Ready until the node lifecycle controller notices.
node_ready() {
	local s
	s=$(kc get node "$NODE_NAME" -o jsonpath='{range .status.conditions[?(@.type=="Ready")]}{.status} {.lastHeartbeatTime}{end}' 2>/dev/null) || return 1
	[[ "${s%% *}" == True ]] || return 1
	[[ -z "${1:-}" || ! "${s#* }" < "$1" ]]
}

if supervisor_pid >/dev/null && bash "$SCRIPT_DIR/node-net.sh" check && node_ready; then
	log "reusing running node $NODE_NAME (pid $(supervisor_pid))"
	exit 0
fi

# Whatever is left of an earlier node goes first (processes, containers,
# cgroups); the network is kept when it is as configured.
bash "$SCRIPT_DIR/node-down.sh" --keep-network >&2
bash "$SCRIPT_DIR/node-net.sh" up

[[ -f "$NODE_E2E/controlplane/node/kubelet.kubeconfig" ]] ||
	{ log "no node kubeconfig: start the control plane with the node (controlplane-up.sh) first"; exit 1; }
CONTROLPLANE_BIN="${KUBE_STS_CONTROLPLANE_BIN:-$("$SCRIPT_DIR/build-controlplane.sh" | tail -n 1)}"
CONTAINERD_DIR=$("$SCRIPT_DIR/build-containerd.sh" | tail -n 1)
NODE_IMAGES=$("$SCRIPT_DIR/build-images.sh" | awk '{ print $2 }' | tr '\n' ' ')
# and whatever node-import.sh imported into an earlier node (when still there)
if [[ -f "$NODE_E2E/run/node-images" ]]; then
	while read -r tar; do
		if [[ -f "$tar" ]]; then NODE_IMAGES+="$tar "; fi
	done <"$NODE_E2E/run/node-images"
fi
PKI="$NODE_E2E/controlplane/pki"

# Without CAP_SYS_RESOURCE (as on these VMs) an oom_score_adj below ours cannot be set.
RESTRICT_OOM=false
capeff=$(awk '/^CapEff:/ { print $2 }' /proc/self/status)
if [[ -z "$capeff" ]] || (( (0x$capeff >> 24 & 1) == 0 )); then
	RESTRICT_OOM=true
fi

t0=$(date +%s)
t0_iso=$(date -u +%Y-%m-%dT%H:%M:%SZ)
rm -rf "$NODE_DIR"
mkdir -p "$NODE_DIR"/{kubelet,pod-logs,volume-plugins,cni/net.d,cni/ipam,containerd} "$NODE_E2E/logs" "$NODE_E2E/run"
: >"$NODE_DIR/resolv.conf" # pods get no resolver: nothing here resolves names

# cgroupRoot must exist in every hierarchy before the kubelet starts; cpuset
# needs its cpus and mems filled in before anything can join below it.
for h in /sys/fs/cgroup/*/; do
	[[ -d "$h" && ! -L "${h%/}" ]] || continue
	mountpoint -q "$h" || continue
	mkdir -p "$h$NODE_CGROUP"
done
if [[ -f /sys/fs/cgroup/cpuset/cpuset.cpus ]]; then
	cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$NODE_CGROUP/cpuset.cpus"
	cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$NODE_CGROUP/cpuset.mems"
fi

cat >"$NODE_DIR/containerd.toml" <<EOF
version = 3
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$NODE_SOCK"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "kube-sts.local/pause:e2e"

[plugins.'io.containerd.cri.v1.runtime']
  netns_mounts_under_state_dir = true
  # No process here may lower its oom_score_adj below the parent's
  # (CAP_SYS_RESOURCE is not in the machine's bounding set): runc would fail
  # every sandbox writing the kubelet's -998. Clamp to containerd's own.
  restrict_oom_score_adj = $RESTRICT_OOM
  enable_unprivileged_ports = true
  enable_unprivileged_icmp = true
  cdi_spec_dirs = []
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    BinaryName = "$(command -v runc)"
    SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "$NODE_DIR/cni/net.d"
    max_conf_num = 1

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF

cat >"$NODE_DIR/cni/net.d/10-kubests.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "kubests",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$POD_GW"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NODE_DIR/cni/ipam"
      }
    }
  ]
}
EOF

cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_ADDR
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/client-ca.crt}
authorization: {mode: Webhook}
containerRuntimeEndpoint: unix://$NODE_SOCK
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failCgroupV1: false
failSwapOn: false
protectKernelDefaults: true
podLogsDir: $NODE_DIR/pod-logs
volumePluginDir: $NODE_DIR/volume-plugins
resolvConf: $NODE_DIR/resolv.conf
syncFrequency: $KUBELET_SYNC
# Images are imported, never pulled: never garbage-collect them, and evict
# only when the machine is really out of room.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, nodefs.inodesFree: 1%, imagefs.available: 1%}
serializeImagePulls: false
maxPods: 110
EOF

cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clientConnection:
  kubeconfig: $NODE_E2E/controlplane/node/kube-proxy.kubeconfig
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# The conntrack table size and timeouts are machine-wide or owned by the
# host: leave them alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF

[[ -f "$LOG" ]] && mv -f "$LOG" "$LOG.1"
log "starting the node $NODE_NAME in $NODE_NETNS"
export NODE_DIR NODE_E2E CONTROLPLANE_BIN CONTAINERD_DIR NODE_IMAGES NODE_NAME NODE_ADDR
setsid nohup nsenter --net="/run/netns/$NODE_NETNS" -- \
	unshare --mount --propagation private -- bash "$SCRIPT_DIR/node-run.sh" </dev/null >>"$LOG" 2>&1 &
echo $! >"$NODE_PIDFILE"

fail() {
	log "$1"
	for f in node kubelet containerd kube-proxy; do
		[[ -f "$NODE_E2E/logs/$f.log" ]] || continue
		echo "----- last 25 lines of .e2e/logs/$f.log -----" >&2
		tail -n 25 "$NODE_E2E/logs/$f.log" >&2 || true
	done
	bash "$SCRIPT_DIR/node-down.sh" >&2 || true
	exit 1
}

deadline=$(($(date +%s) + TIMEOUT))
until node_ready "$t0_iso"; do
	supervisor_pid >/dev/null || fail "the node's supervisor exited during start-up"
	(($(date +%s) < deadline)) || fail "Node $NODE_NAME not Ready after ${TIMEOUT}s"
	sleep 1
done
# What tests and scripts need to know of the node.
cat >"$NODE_E2E/node.env" <<EOF
KUBE_STS_NODE_NAME=$NODE_NAME
KUBE_STS_NODE_ADDRESS=$NODE_ADDR
KUBE_STS_NODE_HOST_ADDRESS=$HOST_ADDR
KUBE_STS_NODE_POD_CIDR=$POD_CIDR
KUBE_STS_NODE_SOCKET=$NODE_SOCK
EOF
log "node $NODE_NAME Ready in $(($(date +%s) - t0))s (InternalIP $NODE_ADDR, pods $POD_CIDR; logs .e2e/logs/{kubelet,containerd,kube-proxy}.log)"
