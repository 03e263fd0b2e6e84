#!/usr/bin/env bash
# Checks for (and where possible installs) what `make demo` and `make test` need:
# cargo, go, python3 with venv, kubectl, make, faketime (the e2e suite runs an operator with a
# shifted clock). Everything else is built or installed
# by the scripts themselves into a cache outside the work tree.
set -euo pipefail
missing=()
for tool in cargo go python3 kubectl make faketime; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-prereqs: missing: ${missing[*]}" >&2
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    pkgs=()
    for m in "${missing[@]}"; do
      case "$m" in
        cargo) pkgs+=(cargo) ;; go) pkgs+=(golang-go) ;; python3|python3-venv) pkgs+=(python3 python3-venv) ;;
        kubectl) pkgs+=(kubernetes-client) ;; make) pkgs+=(make) ;; faketime) pkgs+=(faketime) ;;
      esac
    done
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}"
  else
    echo "install-prereqs: install them and run again" >&2
    exit 1
  fi
fi
echo "install-prereqs: cargo, go, python3, kubectl, make and faketime are present" >&2
