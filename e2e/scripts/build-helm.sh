#!/usr/bin/env bash
# Installs helm v3.19.5 from source with `go install` into the cache outside the
# work tree, only if it is not there yet. Prints helm's path as the last line
# on stdout; everything else goes to stderr.
#
#   KUBE_STS_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts)
#
# Built without the release ldflags, this helm assumes an old Kubernetes minor
# in `helm template`: pass --kube-version there.
set -euo pipefail

HELM_VERSION=v3.19.5
CACHE="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"
GOBIN_DIR="$CACHE/bin/helm-$HELM_VERSION"
HELM="$GOBIN_DIR/helm"

if [[ -x "$HELM" ]]; then
	echo "build-helm: up to date: $HELM" >&2
	echo "$HELM"
	exit 0
fi

command -v go >/dev/null 2>&1 || { echo "build-helm: go not found in PATH" >&2; exit 1; }
mkdir -p "$GOBIN_DIR"
# One install at a time per cache; a second caller waits and then finds helm.
exec 9>"$CACHE/bin/.helm.lock"
if command -v flock >/dev/null 2>&1; then
	flock 9
fi
if [[ -x "$HELM" ]]; then
	echo "build-helm: installed meanwhile: $HELM" >&2
	echo "$HELM"
	exit 0
fi
echo "build-helm: installing helm $HELM_VERSION into $GOBIN_DIR" >&2
start=$(date +%s)
# Run outside any module so the work tree's go.mod files play no part.
(
	cd "$GOBIN_DIR"
	GOBIN="$GOBIN_DIR" CGO_ENABLED=0 go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
) >&2
echo "build-helm: installed in $(($(date +%s) - start))s" >&2
echo "$HELM"
