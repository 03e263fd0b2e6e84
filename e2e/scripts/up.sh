#!/usr/bin/env bash
# Starts the local control plane and the STS peer (each reused when already healthy).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/controlplane-up.sh" >/dev/null
bash "$here/sts-up.sh" >/dev/null
repo="$(cd "$here/../.." && pwd)"
echo "up: control plane (KUBECONFIG=$repo/.e2e/kubeconfig) and STS peer ($repo/.e2e/aws.env) are running" >&2
