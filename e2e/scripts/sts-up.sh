#!/usr/bin/env bash
# Start (idempotently) the local STS/IAM/ECR peer in the background:
#   moto        127.0.0.1:15000  IAM enforcement ON after setup   (MOTO_URL)
#   moto-noauth 127.0.0.1:15001  no enforcement, serves AssumeRoleWithWebIdentity (MOTO_NOAUTH_URL)
#   sts-proxy   127.0.0.1:15002  what clients use (AWS_ENDPOINT_URL[_STS]); routes by Action
# then seeds IAM users and switches enforcement on (e2e/sts/setup.py), which writes
# .e2e/aws.env (operator) and .e2e/aws-admin.env (admin).
#
# A running set is reused when every pid is alive, .e2e/aws.env exists and a signed
# GetCallerIdentity with the operator key succeeds; otherwise stale processes are
# stopped and a fresh set is started (moto keeps state in memory only).
#
# pids: .e2e/run/<name>.pid   logs: .e2e/logs/<name>.log
# recorder files: .e2e/run/<name>.recording (MOTO_RECORDER_FILEPATH, one per moto)
# With the node (node-env.sh) the proxy also listens on <node subnet>.1:<proxy port>, the
# host's end of the node link, so that pods reach the peer.
# Env: KUBE_STS_MOTO_PORT, KUBE_STS_MOTO_NOAUTH_PORT, KUBE_STS_PROXY_PORT,
#      KUBE_STS_START_TIMEOUT (seconds, default 90), plus those of sts-venv.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
e2e="$repo/.e2e"
run="$e2e/run"
logs="$e2e/logs"
moto_port="${KUBE_STS_MOTO_PORT:-15000}"
noauth_port="${KUBE_STS_MOTO_NOAUTH_PORT:-15001}"
proxy_port="${KUBE_STS_PROXY_PORT:-15002}"
timeout_s="${KUBE_STS_START_TIMEOUT:-90}"
names=(moto moto-noauth sts-proxy)
# With the node, the proxy also listens on the host's end of the node link, where pods
# reach it (node-env.sh; the link exists once node-net.sh up has run).
# shellcheck source=node-env.sh
. "$here/node-env.sh"
also_listen=()
if [[ "$NODE_ENABLED" == 1 ]]; then
  also_listen=(--also-listen "$HOST_ADDR:$proxy_port")
fi
for p in "$moto_port" "$noauth_port" "$proxy_port"; do
  [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] ||
    { echo "sts-up: bad port '$p'" >&2; exit 1; }
done

log() { echo "sts-up: $*" >&2; }

mkdir -p "$run" "$logs"
if command -v flock >/dev/null 2>&1; then
  exec 8>"$run/sts.lock"
  flock -w "$timeout_s" 8 || { log "another sts-up.sh holds $run/sts.lock"; exit 1; }
fi

venv="$(bash "$here/sts-venv.sh" | tail -n 1)"
py="$venv/bin/python"

# pid from pid file if that process is alive and still looks like ours.
live_pid() {
  local f="$run/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE 'moto|proxy\.py' || return 1
  echo "$pid"
}

operator_ok() {
  [ -f "$e2e/aws.env" ] || return 1
  "$py" - "$e2e/aws.env" <<'EOF' >/dev/null 2>&1
import sys, boto3
from botocore.config import Config
env = dict(l.rstrip("\n").split("=", 1) for l in open(sys.argv[1]) if "=" in l)
sts = boto3.client("sts", endpoint_url=env["AWS_ENDPOINT_URL_STS"], region_name=env["AWS_REGION"],
                   aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                   config=Config(retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10))
arn = sts.get_caller_identity()["Arn"]
sys.exit(0 if arn == env["KUBE_STS_OPERATOR_ARN"] else 1)
EOF
}

healthy() {
  local n
  for n in "${names[@]}"; do live_pid "$n" >/dev/null || return 1; done
  # Started with the listeners asked for now?
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$(live_pid sts-proxy)/cmdline") || return 1
  if ((${#also_listen[@]})); then
    grep -qF -- "${also_listen[*]}" <<<"$cmdline" || return 1
  else
    ! grep -qF -- "--also-listen" <<<"$cmdline" || return 1
  fi
  operator_ok
}

fail() { # message: print it and the log tails, stop what was started, exit 1
  log "$*"
  tails
  bash "$here/sts-down.sh" >&2 || true
  exit 1
}

tails() {
  local n
  for n in "${names[@]}"; do
    if [ -f "$logs/$n.log" ]; then
      echo "----- tail $logs/$n.log -----" >&2
      tail -n 40 "$logs/$n.log" >&2 || true
    fi
  done
}

port_busy() {
  "$py" -c 'import socket,sys
s=socket.socket(); s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}

# Any HTTP answer (whatever the status) means the server is serving.
http_up() {
  "$py" -c 'import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
except Exception:
    sys.exit(1)' "$1"
}

if healthy; then
  log "reusing running peer (moto :$moto_port, moto-noauth :$noauth_port, proxy :$proxy_port)"
  echo "$e2e/aws.env"
  exit 0
fi

t0=$(date +%s)
bash "$here/sts-down.sh" >&2
for p in "$moto_port" "$noauth_port" "$proxy_port"; do
  if port_busy "$p"; then
    log "127.0.0.1:$p is in use by a process not tracked in $run; stop it first"
    exit 1
  fi
done

start() { # name, command...
  local name="$1"; shift
  : >"$logs/$name.log"
  rm -f "$run/$name.pid"
  (
    cd "$run"
    exec 8>&- # do not hand the sts.lock fd to the servers (they would hold the lock forever)
    unset INITIAL_NO_AUTH_ACTION_COUNT MOTO_ENABLE_RECORDING
    export MOTO_RECORDER_FILEPATH="$run/$name.recording"
    # New session (own process group, no controlling tty); the process writes its
    # own pid (atomically) and then execs the server, so the pid file names the
    # server itself whether or not setsid forked.
    setsid -f sh -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec nohup "$@"' \
      "$run/$name.pid" "$@" >>"$logs/$name.log" 2>&1 </dev/null
  )
}

start moto "$py" -m moto.server -H 127.0.0.1 -p "$moto_port"
start moto-noauth "$py" -m moto.server -H 127.0.0.1 -p "$noauth_port"
start sts-proxy "$py" "$repo/e2e/sts/proxy.py" --listen "127.0.0.1:$proxy_port" "${also_listen[@]}" \
  --enforced "127.0.0.1:$moto_port" --noauth "127.0.0.1:$noauth_port"

deadline=$((t0 + timeout_s))
declare -A url=(
  [moto]="http://127.0.0.1:$moto_port/moto-api/"
  [moto-noauth]="http://127.0.0.1:$noauth_port/moto-api/"
  [sts-proxy]="http://127.0.0.1:$proxy_port/__proxy__/healthz"
)
for n in "${names[@]}"; do
  until [ -s "$run/$n.pid" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "$n wrote no pid file within ${timeout_s}s"
    fi
    sleep 0.1
  done
  until http_up "${url[$n]}"; do
    if ! live_pid "$n" >/dev/null; then
      fail "$n exited during startup"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "$n not answering at ${url[$n]} after ${timeout_s}s"
    fi
    sleep 0.2
  done
done

# Both motos start with an empty, unenforced state; the recorder files must exist
# before the first download-recording (moto opens them for reading).
for n in moto moto-noauth; do : >"$run/$n.recording"; done

if ! "$py" "$repo/e2e/sts/setup.py" \
  --moto-url "http://127.0.0.1:$moto_port" \
  --noauth-url "http://127.0.0.1:$noauth_port" \
  --proxy-url "http://127.0.0.1:$proxy_port" \
  --out-dir "$e2e"; then
  fail "setup failed"
fi
if ! operator_ok; then
  fail "operator GetCallerIdentity through the proxy failed after setup"
fi
log "peer ready in $(($(date +%s) - t0))s: operator env $e2e/aws.env, admin env $e2e/aws-admin.env"
echo "$e2e/aws.env"
