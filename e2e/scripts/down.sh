#!/usr/bin/env bash
# Stops what up.sh started (by process id) and removes what the node created
# (network namespace, link, cgroups, containers, mounts: node-down.sh).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/node-down.sh"
bash "$here/sts-down.sh"
bash "$here/controlplane-down.sh"
