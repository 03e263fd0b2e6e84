#!/usr/bin/env bash
# Imports OCI image archives (build-image.sh, build-images.sh) into the running node's
# containerd (namespace k8s.io, where the kubelet finds them; nothing is ever pulled) and
# records them in .e2e/run/node-images, so that every later start of the node (which
# begins with an empty containerd) imports them again.
#
#   node-import.sh IMAGE.tar...
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=node-env.sh
. "$SCRIPT_DIR/node-env.sh"
log() { echo "node-import: $*" >&2; }
(($#)) || { echo "usage: node-import.sh IMAGE.tar..." >&2; exit 2; }
CTR="$(bash "$SCRIPT_DIR/build-containerd.sh" | tail -n 1)/ctr"
[[ -S "$NODE_SOCK" ]] || { log "the node is not running (no $NODE_SOCK): make up"; exit 1; }
list="$NODE_E2E/run/node-images"
mkdir -p "$(dirname "$list")"
touch "$list"
for tar in "$@"; do
	tar=$(realpath "$tar")
	"$CTR" --address "$NODE_SOCK" -n k8s.io images import --local "$tar" >/dev/null
	grep -qxF "$tar" "$list" || echo "$tar" >>"$list"
	log "imported $tar"
done
