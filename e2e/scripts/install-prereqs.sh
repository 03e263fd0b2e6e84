#!/usr/bin/env bash
# Checks for (and where possible installs) what `make demo` and `make test` need:
# cargo, go, python3 with venv, kubectl, make, faketime (the e2e suite runs an operator with a
# shifted clock), and for the local node (KUBE_STS_NODE=1, the default): runc, the CNI
# plugins (bridge, host-local, loopback), iptables, nftables (kube-proxy's nftables mode),
# conntrack, iproute2, a static busybox (the test pods' image) and gcc with a static libc
# (the pause image). Everything else (kube-apiserver, kubelet, containerd, the STS peer,
# helm, the images) is built or installed by the scripts themselves into a cache outside
# the work tree.
set -euo pipefail
missing=()
pkgs=()
need() { # need CHECK-COMMAND... -- DEBIAN-PACKAGE
  local pkg="${*: -1}"
  if ! eval "${*:1:$#-2}" >/dev/null 2>&1; then
    missing+=("$pkg")
    pkgs+=("$pkg")
  fi
}
need command -v cargo -- cargo
need command -v go -- golang-go
need command -v python3 -- python3
need python3 -c "'import venv, ensurepip'" -- python3-venv
need command -v kubectl -- kubernetes-client
need command -v make -- make
need command -v faketime -- faketime
if [ "${KUBE_STS_NODE:-1}" = 1 ]; then
  need command -v runc -- runc
  need test -x /usr/lib/cni/bridge -- containernetworking-plugins
  need command -v iptables -- iptables
  need command -v nft -- nftables
  need command -v conntrack -- conntrack
  need command -v ip -- iproute2
  need command -v nsenter -- util-linux
  need "test -x /bin/busybox && ! readelf -l /bin/busybox | grep -q INTERP" -- busybox-static
  need command -v gcc -- gcc
  need test -f /usr/lib/x86_64-linux-gnu/libc.a -- libc6-dev
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-prereqs: missing: ${missing[*]}" >&2
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    echo "install-prereqs: install them and run again" >&2
    exit 1
  fi
fi
echo "install-prereqs: cargo, go, python3, kubectl, make and faketime are present" >&2
[ "${KUBE_STS_NODE:-1}" = 1 ] &&
  echo "install-prereqs: and for the node: runc, CNI plugins, iptables, nftables, conntrack, iproute2, busybox-static, gcc with libc6-dev" >&2
exit 0
