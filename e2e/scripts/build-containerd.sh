#!/usr/bin/env bash
# Builds containerd 2.x (containerd, containerd-shim-runc-v2, ctr) from its Go
# module through the module proxy into the cache, once per version. Static
# (no cgo): the btrfs, devmapper and zfs snapshotters are left out; the node
# uses overlayfs. Prints the bin directory as the last line on stdout.
#
#   KUBE_STS_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts)
set -euo pipefail
VERSION=v2.4.2
CACHE="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"
DIR="$CACHE/containerd-$VERSION"
BIN="$DIR/bin"
log() { echo "build-containerd: $*" >&2; }
tools=(containerd containerd-shim-runc-v2 ctr)

have_all() { local t; for t in "${tools[@]}"; do [[ -x "$BIN/$t" ]] || return 1; done; }
if have_all; then
	log "up to date: $BIN"
	echo "$BIN"
	exit 0
fi
command -v go >/dev/null || { log "go not found in PATH"; exit 1; }
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
if have_all; then echo "$BIN"; exit 0; fi

log "building containerd $VERSION (go install, about a minute with a warm Go cache)"
start=$(date +%s)
tmp="$DIR/bin.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
pkgs=()
for t in "${tools[@]}"; do pkgs+=("github.com/containerd/containerd/v2/cmd/$t@$VERSION"); done
CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -tags "no_btrfs no_devmapper no_zfs" \
	-ldflags "-s -w -X github.com/containerd/containerd/v2/version.Version=$VERSION" "${pkgs[@]}" >&2
rm -rf "$BIN"
mv "$tmp" "$BIN"
trap - EXIT
log "built in $(($(date +%s) - start))s: $("$BIN/containerd" --version)"
echo "$BIN"
