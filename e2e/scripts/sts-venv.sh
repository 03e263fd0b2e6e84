#!/usr/bin/env bash
# Create (only if missing) the Python virtualenv that runs the local STS peer
# (moto + proxy + setup/check scripts) and print its path as the LAST stdout line.
# Everything else goes to stderr.
#
# Location: ${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}/venv-<sha12>
# where <sha12> = first 12 hex digits of sha256(e2e/sts/requirements.txt), so a
# change of pins gives a new venv and old ones can simply be deleted.
#
# Safe to rerun and safe after an interrupted install: the venv counts as ready
# only once the marker file (written last) exists; a directory without it is
# wiped and rebuilt. Concurrent callers are serialised with flock when available.
#
# Env: PYTHON (default python3, needs >= 3.9), KUBE_STS_CACHE, XDG_CACHE_HOME.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
req="$repo/e2e/sts/requirements.txt"
py="${PYTHON:-python3}"

log() { echo "sts-venv: $*" >&2; }

[ -f "$req" ] || { log "missing $req"; exit 1; }
command -v "$py" >/dev/null 2>&1 || { log "no $py on PATH (set PYTHON)"; exit 1; }
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' ||
  { log "$py is older than 3.9"; exit 1; }

sha="$("$py" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:12])' "$req")"
cache="${KUBE_STS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kube-sts}"
venv="$cache/venv-$sha"
marker="$venv/.kube-sts-ready"
mkdir -p "$cache"

ready() {
  [ -f "$marker" ] && [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sys' >/dev/null 2>&1
}

if ! ready; then
  # Serialise concurrent installs of the same venv.
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache/venv-$sha.lock"
    flock 9
  fi
  if ! ready; then
    start=$(date +%s)
    log "creating $venv (one-off, ~2 min cold)"
    rm -rf "$venv"
    "$py" -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req" >&2
    "$venv/bin/python" -c 'import moto, boto3, flask' >&2
    cp "$req" "$venv/requirements.txt"
    date -u +%Y-%m-%dT%H:%M:%SZ >"$marker"
    log "ready in $(($(date +%s) - start))s"
  fi
fi

echo "$venv"
