#!/usr/bin/env bash
# The node's supervisor. node-up.sh starts it inside the node's network
# namespace and a new, private mount namespace:
#
#   nsenter --net=/run/netns/kubests-<id> -- unshare --mount --propagation private -- node-run.sh
#
# so every mount the node makes (containerd's snapshots, the kubelet's Secret
# volumes, pod network namespaces) exists only in that mount namespace and
# disappears with its last process. It starts containerd, imports the local
# images, then runs the kubelet and kube-proxy; when one of them exits it
# stops the others and exits. SIGTERM stops them all (kubelet and kube-proxy
# first, containerd last). The environment comes from node-up.sh.
set -euo pipefail
: "${NODE_DIR:?}" "${NODE_E2E:?}" "${CONTROLPLANE_BIN:?}" "${CONTAINERD_DIR:?}" "${NODE_IMAGES:?}"
log() { echo "node-run: $(date +%H:%M:%S) $*" >&2; }
export PATH="$CONTAINERD_DIR:/usr/sbin:/usr/bin:/sbin:/bin"
LOGS="$NODE_E2E/logs"

# Private mounts: paths some of these programs write to whatever their
# configuration says (containerd's shim sockets and runc state under /run,
# CNI's cache under /var/lib/cni, the kubelet's /var/log/containers links)
# land in the node's own directories.
mount -n -t tmpfs -o mode=0755,size=64m kubests-run /run
mkdir -p "$NODE_DIR/var-lib" "$NODE_DIR/var-log" "$NODE_DIR/sysctl"
mount -n --bind "$NODE_DIR/var-lib" /var/lib
mount -n --bind "$NODE_DIR/var-log" /var/log
# The kubelet sets these machine-wide kernel tunables at start unless they
# already hold its values (vm.overcommit_memory=1, kernel.panic=10,
# kernel.panic_on_oops=1, ...). They are not per namespace: changing them would
# change the whole machine. Here it reads its values from files bound over
# /proc/sys in this mount namespace only (protectKernelDefaults makes it fail,
# not write, should that ever not hold).
for kv in vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1 \
	kernel/keys/root_maxkeys=1000000 kernel/keys/root_maxbytes=25000000; do
	key=${kv%%=*}
	file="$NODE_DIR/sysctl/${key//\//.}"
	echo "${kv#*=}" >"$file"
	mount -n --bind "$file" "/proc/sys/$key"
done

pids=()
names=()
stopping=0
stop_all() {
	stopping=1
	local i
	# kubelet and kube-proxy first, containerd (index 0) last.
	for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
		kill -TERM "${pids[$i]}" 2>/dev/null || true
		for _ in $(seq 1 60); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.25; done
		kill -KILL "${pids[$i]}" 2>/dev/null || true
	done
}
trap 'log "stopping"; stop_all; exit 0' TERM INT

start() { # name, command...
	local name=$1
	shift
	[[ -f "$LOGS/$name.log" ]] && mv -f "$LOGS/$name.log" "$LOGS/$name.log.1"
	"$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
	pids+=($!)
	names+=("$name")
	log "started $name (pid $!)"
}

start containerd containerd --config "$NODE_DIR/containerd.toml"
for _ in $(seq 1 120); do
	[[ -S "$NODE_DIR/containerd.sock" ]] && ctr --address "$NODE_DIR/containerd.sock" version >/dev/null 2>&1 && break
	kill -0 "${pids[0]}" 2>/dev/null || { log "containerd exited; see $LOGS/containerd.log"; exit 1; }
	sleep 0.25
done
ctr --address "$NODE_DIR/containerd.sock" version >/dev/null || { log "containerd did not answer"; stop_all; exit 1; }
# The kubelet's cAdvisor looks for containerd at its default address only (in
# this namespace's private /run).
mkdir -p /run/containerd
ln -sf "$NODE_DIR/containerd.sock" /run/containerd/containerd.sock

for image in $NODE_IMAGES; do
	ctr --address "$NODE_DIR/containerd.sock" -n k8s.io images import --local "$image" >/dev/null ||
		{ log "importing $image failed"; stop_all; exit 1; }
done
log "imported: $(ctr --address "$NODE_DIR/containerd.sock" -n k8s.io images ls -q | tr '\n' ' ')"

start kubelet "$CONTROLPLANE_BIN" kubelet \
	--config="$NODE_DIR/kubelet.yaml" \
	--kubeconfig="$NODE_E2E/controlplane/node/kubelet.kubeconfig" \
	--root-dir="$NODE_DIR/kubelet" \
	--cert-dir="$NODE_DIR/kubelet/pki" \
	--hostname-override="$NODE_NAME" \
	--node-ip="$NODE_ADDR" \
	--v="${KUBE_STS_NODE_V:-1}"
start kube-proxy "$CONTROLPLANE_BIN" kube-proxy \
	--config="$NODE_DIR/kube-proxy.yaml" \
	--v="${KUBE_STS_NODE_V:-1}"

# Whichever exits first ends the node: a half node is worse than none.
set +e
wait -n "${pids[@]}"
code=$?
set -e
if ((stopping == 0)); then
	for i in "${!pids[@]}"; do
		kill -0 "${pids[$i]}" 2>/dev/null || log "${names[$i]} exited (code $code); see $LOGS/${names[$i]}.log"
	done
	stop_all
fi
exit 1
