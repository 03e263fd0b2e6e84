#!/usr/bin/env bash
# Builds the node's local images as OCI archives, with no container engine and
# no registry, into the cache (rebuilt only when their inputs change):
#   kube-sts.local/pause:e2e    the sandbox image: a static pause (e2e/images/pause.c)
#   kube-sts.local/busybox:e2e  Debian's static busybox with its applets, for test pods
# Prints one line per image on stdout: "REF PATH".
#
#   KUBE_STS_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts)
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"
OUT="$CACHE/images"
IMAGES="$REPO/e2e/images"
log() { echo "build-images: $*" >&2; }

BUSYBOX=/bin/busybox
command -v gcc >/dev/null || { log "gcc not found (e2e/scripts/install-prereqs.sh installs it)"; exit 1; }
[[ -x "$BUSYBOX" ]] && "$BUSYBOX" --list >/dev/null 2>&1 ||
	{ log "$BUSYBOX (Debian's busybox-static) not found; run e2e/scripts/install-prereqs.sh"; exit 1; }
file_is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'INTERP'; }
file_is_static "$BUSYBOX" || { log "$BUSYBOX is not static (install busybox-static, not busybox)"; exit 1; }

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

# inputs_hash FILE...: content hash of the inputs (and of this script and the assembler).
inputs_hash() { cat "$@" "${BASH_SOURCE[0]}" "$IMAGES/oci-image.py" | sha256sum | cut -c1-12; }

# pause
h=$(inputs_hash "$IMAGES/pause.c")
pause="$OUT/pause-$h.tar"
if [[ ! -s "$pause" ]]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	gcc -static -Os -s -o "$tmp/pause" "$IMAGES/pause.c"
	python3 "$IMAGES/oci-image.py" --ref kube-sts.local/pause:e2e --out "$pause" \
		--file "$tmp/pause:/pause:0755" --user 65535:65535 --entrypoint '["/pause"]'
	rm -rf "$tmp"
	trap - EXIT
fi
echo "kube-sts.local/pause:e2e $pause"

# busybox
h=$(inputs_hash "$BUSYBOX")
busybox="$OUT/busybox-$h.tar"
if [[ ! -s "$busybox" ]]; then
	args=(--file "$BUSYBOX:/bin/busybox:0755" --dir tmp:1777 --text "etc/passwd=root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
	args+=(--text "etc/group=root:x:0:\nnogroup:x:65534:\n")
	for applet in $("$BUSYBOX" --list); do
		[[ "$applet" == busybox ]] || args+=(--symlink "bin/$applet:busybox")
	done
	python3 "$IMAGES/oci-image.py" --ref kube-sts.local/busybox:e2e --out "$busybox" "${args[@]}" \
		--cmd '["/bin/sh"]'
fi
echo "kube-sts.local/busybox:e2e $busybox"

# Keep the two newest archives of each image.
for name in pause busybox; do
	ls -1t "$OUT/$name"-*.tar 2>/dev/null | tail -n +3 | while read -r old; do rm -f -- "$old"; done
done
