#!/usr/bin/env bash
# moto server 5.2.5 (from PyPI, in a virtualenv under .cache/) on 127.0.0.1 only: the AWS
# API peer for the DynamoDB idempotency store. (LocalStack serves SQS/SNS/KMS/STS for the
# other AWS tests, but its DynamoDB downloads DynamoDB Local at run time, which needs the
# internet; moto implements DynamoDB in-process.) It runs through moto_server.py, which
# serves one request at a time: moto's conditional writes are not atomic otherwise.
#
#   eval "$(tests/support/moto.sh start)"   # installs on first use, starts, prints exports
#   tests/support/moto.sh install           # only installs (tests/run.sh, while it builds)
#   tests/support/moto.sh status
#   tests/support/moto.sh stop
#
# stdout carries only the `export` lines; progress goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
port=${SOURCEFLOW_MOTO_PORT:-5055}
root=$PWD/.cache/moto-$port
venv=$PWD/.cache/moto-venv
pidfile=$root/moto.pid
log=$root/moto.log
endpoint="http://127.0.0.1:$port"

say() { echo "moto.sh: $*" >&2; }

exports() {
    echo "export SOURCEFLOW_TEST_DYNAMODB_ENDPOINT=$endpoint"
}

healthy() {
    python3 - "$endpoint" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/moto-api/", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

install() {
    if [ -x "$venv/bin/moto_server" ]; then
        return
    fi
    say "installing moto[server] 5.2.5 into $venv (first use only)"
    py=$(command -v python3.11 || command -v python3)
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' >&2
}

start() {
    if healthy; then
        exports
        return
    fi
    install
    mkdir -p "$root"
    say "starting moto server on 127.0.0.1:$port"
    (
        cd "$root"
        nohup "$venv/bin/python" "$here/moto_server.py" 127.0.0.1 "$port" >"$log" 2>&1 &
        echo $! >"$pidfile"
    )
    for _ in $(seq 1 60); do
        if healthy; then
            say "ready"
            exports
            return
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            rm -f "$pidfile"
            say "moto exited; last lines of $log:"
            tail -c 2000 "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    say "moto did not become ready within 30 s; see $log"
    exit 1
}

stop() {
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 20); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$pidfile"
        say "stopped"
    fi
}

case "${1:-}" in
    start) start ;;
    install) install ;;
    stop) stop ;;
    status) if healthy; then say "running at $endpoint"; else say "not running"; exit 1; fi ;;
    *) echo "usage: $0 start|install|stop|status" >&2; exit 2 ;;
esac
