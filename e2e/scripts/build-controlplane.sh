#!/usr/bin/env bash
# Builds the local control-plane binary (e2e/controlplane) into a cache outside
# the work tree, only when no binary exists yet for the current sources.
# Prints the binary's path as the last line on stdout; everything else goes to
# stderr.
#
#   KUBE_STS_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts)
#
# A cold build compiles kube-apiserver and kube-controller-manager: many minutes
# on 2 cores and ~2-3 GiB of memory. GOMODCACHE and GOCACHE are Go's defaults.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
SRC="$REPO/e2e/controlplane"
CACHE="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"
BIN_DIR="$CACHE/bin"

command -v go >/dev/null 2>&1 || { echo "build-controlplane: go not found in PATH" >&2; exit 1; }

# Content hash over go.mod, go.sum and the Go sources (names included).
hash=$(
	cd "$SRC"
	export LC_ALL=C
	for f in go.mod go.sum $(ls -1 -- *.go | sort); do
		printf '%s\0' "$f"
		cat -- "$f"
	done | sha256sum | cut -c1-12
)
BIN="$BIN_DIR/controlplane-$hash"

if [[ -x "$BIN" ]]; then
	echo "build-controlplane: up to date: $BIN" >&2
	echo "$BIN"
	exit 0
fi

mkdir -p "$BIN_DIR"
# One build at a time per cache; a second caller waits and then finds the binary.
exec 9>"$BIN_DIR/.controlplane.lock"
if command -v flock >/dev/null 2>&1; then
	flock 9
fi
if [[ -x "$BIN" ]]; then
	echo "build-controlplane: built meanwhile: $BIN" >&2
	echo "$BIN"
	exit 0
fi

# Stamp the Kubernetes version from go.mod, as release builds do: without it
# /version reports v0.0.0-master, which clients such as helm reject.
kube_version=$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v[0-9]/ { print $2; exit }' "$SRC/go.mod")
[[ "$kube_version" =~ ^v([0-9]+)\.([0-9]+)\. ]] || { echo "build-controlplane: no k8s.io/kubernetes version in go.mod" >&2; exit 1; }
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=${BASH_REMATCH[1]} -X $pkg.gitMinor=${BASH_REMATCH[2]}"
	ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=0000000000000000000000000000000000000000"
done

echo "build-controlplane: building $BIN (a cold build takes many minutes)" >&2
start=$(date +%s)
tmp="$BIN.tmp.$$"
trap 'rm -f "$tmp"' EXIT
(
	cd "$SRC"
	CGO_ENABLED=0 go build -trimpath -ldflags="$ldflags" -o "$tmp" .
) >&2
mv -f "$tmp" "$BIN"
trap - EXIT
echo "build-controlplane: built in $(($(date +%s) - start))s ($(du -h "$BIN" | cut -f1))" >&2

# Keep the three most recent binaries; each is ~100 MB.
ls -1t "$BIN_DIR"/controlplane-* 2>/dev/null | grep -v '\.tmp\.' | tail -n +4 | while read -r old; do
	rm -f -- "$old"
done

echo "$BIN"
