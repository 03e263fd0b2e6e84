#!/usr/bin/env bash
# Stops what up.sh started (by process id).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/sts-down.sh"
bash "$here/controlplane-down.sh"
