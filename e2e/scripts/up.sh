#!/usr/bin/env bash
# Starts the local environment, each part reused when already healthy: the node's
# network, the control plane, the STS peer and the node (kubelet, containerd,
# kube-proxy). KUBE_STS_NODE=0 leaves the node out (control plane and STS only).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=node-env.sh
. "$here/node-env.sh"
t0=$(date +%s)
if [[ "$NODE_ENABLED" == 1 ]]; then
  bash "$here/node-net.sh" up
fi
bash "$here/controlplane-up.sh" >/dev/null
bash "$here/sts-up.sh" >/dev/null
repo="$(cd "$here/../.." && pwd)"
if [[ "$NODE_ENABLED" == 1 ]]; then
  bash "$here/node-up.sh"
  echo "up: control plane (KUBECONFIG=$repo/.e2e/kubeconfig), node $NODE_NAME and STS peer ($repo/.e2e/aws.env) are running ($(($(date +%s) - t0))s)" >&2
else
  echo "up: control plane (KUBECONFIG=$repo/.e2e/kubeconfig) and STS peer ($repo/.e2e/aws.env) are running, no node ($(($(date +%s) - t0))s)" >&2
fi
