#!/usr/bin/env bash
# Stop the local STS peer started by sts-up.sh (idempotent).
# Stops only the processes named by .e2e/run/<name>.pid (each is the leader of its
# own session/process group, so its group is signalled), then removes the pid files,
# the recorder files and the credential env files (moto's state is gone with it).
# Logs in .e2e/logs are kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
e2e="$repo/.e2e"
run="$e2e/run"
names=(sts-proxy moto moto-noauth)

log() { echo "sts-down: $*" >&2; }

alive() { # pid -> exists and is not a zombie (an unreaped zombie counts as gone)
  kill -0 "$1" 2>/dev/null || return 1
  local state
  state="$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)"
  [ "$state" != "Z" ]
}

ours() { # pid -> is it alive and one of our servers?
  alive "$1" &&
    tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qE 'moto|proxy\.py'
}

stopped=()
for n in "${names[@]}"; do
  f="$run/$n.pid"
  [ -f "$f" ] || continue
  pid="$(cat "$f" 2>/dev/null || true)"
  if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid"; then
    # group first (setsid made the server a group leader), then the pid itself
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    stopped+=("$n:$pid")
  fi
done

# wait (bounded) for them to exit, then force
deadline=$(($(date +%s) + 10))
for entry in "${stopped[@]}"; do
  pid="${entry#*:}"
  while alive "$pid"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      log "${entry%%:*} ($pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
done

for n in "${names[@]}"; do rm -f "$run/$n.pid" "$run/$n.pid.tmp" "$run/$n.recording"; done
rm -f "$e2e/aws.env" "$e2e/aws-admin.env"
if [ "${#stopped[@]}" -gt 0 ]; then
  log "stopped ${stopped[*]}"
else
  log "nothing running"
fi
