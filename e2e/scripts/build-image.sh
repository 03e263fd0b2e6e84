#!/usr/bin/env bash
# `make image` without a container engine: the operator's OCI image, the same
# image the Dockerfile describes (a single static binary on a distroless
# "static" nonroot base: user 65532:65532, no shell, the CA bundle,
# ENTRYPOINT ["/kube-sts"], CMD ["run"], port 8080), assembled by
# e2e/images/oci-image.py from the release binary.
#
# The binary is linked statically against glibc (-C target-feature=+crt-static
# for the host's gnu target, as `make release` builds it; the musl target's
# standard library is not installable here), and stripped. glibc's own "files"
# and "dns" name services are part of the static binary (/etc/nsswitch.conf
# names them). The files the distroless base would bring are written
# here: /etc/passwd and /etc/group (root, nobody, nonroot), /etc/nsswitch.conf,
# the system CA bundle, /home/nonroot and /tmp. tests/image.rs checks that this
# script and the Dockerfile describe the same image.
#
#   build-image.sh                build (cached by content) and print "REF PATH"
#   build-image.sh --binary       only build the static release binary; print its path
#                                 (`make release` uses this)
#   build-image.sh --describe     print the image's config and file list as JSON,
#                                 building nothing
#   build-image.sh consumer       the tests' consumer image instead (below); "REF PATH"
#   KUBE_STS_IMAGE_REF   reference to give the image (default kube-sts.local/kube-sts:<version>)
#   KUBE_STS_CACHE       cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts)
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"
log() { echo "build-image: $*" >&2; }

version=$(awk -F'"' '/^version *=/ { print $2; exit }' "$REPO/Cargo.toml")
REF="${KUBE_STS_IMAGE_REF:-kube-sts.local/kube-sts:$version}"
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
TRIPLE=x86_64-unknown-linux-gnu

# What the image is, apart from the binary: the distroless static nonroot
# base's users, groups and files, and the Dockerfile's final stage.
image_args() { # image_args BINARY
	local passwd='root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n'
	local group='root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n'
	printf '%s\0' \
		--file "$1:/kube-sts:0755" \
		--file "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:0644" \
		--text "etc/passwd=$passwd" \
		--text "etc/group=$group" \
		--text 'etc/nsswitch.conf=passwd: files\ngroup: files\nhosts: files dns\n' \
		--dir "home/nonroot:0700:65532:65532" \
		--dir "tmp:1777" \
		--user 65532:65532 \
		--workdir /home/nonroot \
		--env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		--env "SSL_CERT_FILE=$CA_BUNDLE" \
		--entrypoint '["/kube-sts"]' \
		--cmd '["run"]' \
		--expose 8080/tcp
}

if [[ "${1:-}" == --describe ]]; then
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	: >"$tmp/kube-sts"
	mapfile -d '' args < <(image_args "$tmp/kube-sts")
	python3 "$REPO/e2e/images/oci-image.py" --ref "$REF" --out "$tmp/image.tar" "${args[@]}" --describe
	exit 0
fi

# cargo runs with a fixed environment (whatever calls this: make, a test, a shell),
# so that its fingerprints match and the binary is built once.
# build_binary [CARGO TARGET ARGS] sets $bin (default: the kube-sts binary).
build_binary() {
	local target_dir="${CARGO_TARGET_DIR:-$REPO/target}" keep=() v what=("$@")
	((${#what[@]})) || what=(--bin kube-sts)
	for v in PATH HOME CARGO_HOME RUSTUP_HOME RUSTUP_TOOLCHAIN CARGO_NET_OFFLINE CARGO_HTTP_CAINFO \
		SSL_CERT_FILE SSL_CERT_DIR CURL_CA_BUNDLE HTTPS_PROXY HTTP_PROXY NO_PROXY https_proxy http_proxy no_proxy; do
		[[ -n "${!v:-}" ]] && keep+=("$v=${!v}")
	done
	log "building the static release binary (cargo build --release --target $TRIPLE, crt-static)"
	(cd "$REPO" && env -i "${keep[@]}" CARGO_TARGET_DIR="$target_dir" \
		RUSTFLAGS="-C target-feature=+crt-static" \
		cargo build --locked --release --target "$TRIPLE" --quiet "${what[@]}") >&2
	bin="$target_dir/$TRIPLE/release/kube-sts"
	[[ "${what[0]}" == --example ]] && bin="$target_dir/$TRIPLE/release/examples/${what[1]}"
	if LC_ALL=C readelf -l "$bin" | grep -q INTERP; then
		log "$bin is dynamically linked"
		exit 1
	fi
}

if [[ "${1:-}" == --binary ]]; then
	build_binary
	echo "$bin"
	exit 0
fi

# The consumer image of the tests and the demo: examples/consumer.rs (the AWS SDK,
# GetCallerIdentity every second), static, with busybox's sh and cat, which the
# SDK's credential_process runs.
if [[ "${1:-}" == consumer ]]; then
	build_binary --example consumer
	mkdir -p "$CACHE/images"
	stripped="$CACHE/images/.consumer.stripped.$$"
	trap 'rm -f "$stripped"' EXIT
	strip -o "$stripped" "$bin"
	ref=kube-sts.local/consumer:e2e
	h=$(cat "$stripped" /bin/busybox "${BASH_SOURCE[0]}" "$REPO/e2e/images/oci-image.py" | sha256sum | cut -c1-12)
	out="$CACHE/images/consumer-$h.tar"
	if [[ ! -s "$out" ]]; then
		python3 "$REPO/e2e/images/oci-image.py" --ref "$ref" --out "$out" \
			--file "$stripped:/consumer:0755" --file "/bin/busybox:/bin/busybox:0755" \
			--symlink bin/sh:busybox --symlink bin/cat:busybox --dir tmp:1777 \
			--text 'etc/passwd=root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
			--text 'etc/group=root:x:0:\nnonroot:x:65532:\n' \
			--file "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:0644" \
			--user 65532:65532 --entrypoint '["/consumer"]'
		ls -1t "$CACHE/images"/consumer-*.tar 2>/dev/null | tail -n +3 | while read -r old; do rm -f -- "$old"; done
	fi
	echo "$ref $out"
	exit 0
fi

[[ -f "$CA_BUNDLE" ]] || { log "$CA_BUNDLE not found (Debian's ca-certificates)"; exit 1; }
build_binary
"$bin" version >&2

mkdir -p "$CACHE/images"
# The image carries the binary without its symbol tables.
stripped="$CACHE/images/.kube-sts.stripped.$$"
trap 'rm -f "$stripped"' EXIT
strip -o "$stripped" "$bin"
mapfile -d '' args < <(image_args "$stripped")
h=$( { printf '%s\n' "$REF" "${args[@]//$stripped/kube-sts}"; cat "$stripped" "$CA_BUNDLE" "$REPO/e2e/images/oci-image.py"; } | sha256sum | cut -c1-12)
out="$CACHE/images/kube-sts-$h.tar"
if [[ ! -s "$out" ]]; then
	python3 "$REPO/e2e/images/oci-image.py" --ref "$REF" --out "$out" "${args[@]}"
	ls -1t "$CACHE/images"/kube-sts-*.tar 2>/dev/null | tail -n +4 | while read -r old; do rm -f -- "$old"; done
fi
log "image $REF: $out ($(du -h "$out" | cut -f1))"
echo "$REF $out"
