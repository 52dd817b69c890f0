#!/usr/bin/env bash
# A local AWS API emulator for the tests: LocalStack 4.9.2 in host mode (no Docker), from
# PyPI, in a virtualenv under .cache/, listening on 127.0.0.1:4566 only. It serves SQS, SNS,
# KMS, STS, and CloudFormation (with the S3 and IAM it needs) for the exported template.
#
#   eval "$(tests/support/emulator.sh start)"   # installs on first use, starts, prints exports
#   tests/support/emulator.sh install           # only installs (tests/run.sh, while it builds)
#   tests/support/emulator.sh status
#   tests/support/emulator.sh stop
#
# stdout carries only the `export` lines; progress goes to stderr. The exports include the
# emulator's pid file (the fault tests pause the process with SIGSTOP).
# SOURCEFLOW_EMULATOR_PORT runs a second, separate instance.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD/.cache/emulator-${SOURCEFLOW_EMULATOR_PORT:-4566}
venv=$PWD/.cache/emulator-venv
pidfile=$root/localstack.pid
log=$root/localstack.log
port=${SOURCEFLOW_EMULATOR_PORT:-4566}
endpoint="http://127.0.0.1:$port"

say() { echo "emulator.sh: $*" >&2; }

exports() {
    cat <<EOT
export AWS_ENDPOINT_URL=$endpoint
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_EC2_METADATA_DISABLED=true
export SOURCEFLOW_TEST_EMULATOR_PIDFILE=$pidfile
EOT
}

healthy() {
    python3 - "$endpoint" <<'PY' 2>/dev/null
import json, sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/_localstack/health", timeout=2) as r:
        s = json.load(r).get("services", {})
    ok = all(s.get(x) in ("running", "available") for x in ("sqs", "sns", "kms", "sts", "cloudformation", "s3", "iam"))
    sys.exit(0 if ok else 1)
except Exception:
    sys.exit(1)
PY
}

install() {
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import localstack" 2>/dev/null; then
        return
    fi
    say "installing LocalStack 4.9.2 into $venv (first use only)"
    mkdir -p "$root"
    py=$(command -v python3.11 || command -v python3)
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'localstack-core[runtime]==4.9.2' 'cbor2<6' 'pyopenssl>=25,<26' \
        'cryptography>=45.0.7,<47' service_identity >&2
}

start() {
    if healthy; then
        exports
        return
    fi
    install
    mkdir -p "$root/fs"
    say "starting LocalStack on 127.0.0.1:$port"
    (
        cd "$root"
        SERVICES=sqs,sns,kms,sts,cloudformation,s3,iam EAGER_SERVICE_LOADING=1 SQS_ENDPOINT_STRATEGY=path \
        GATEWAY_LISTEN=127.0.0.1:$port LOCALSTACK_HOST=127.0.0.1:$port DISABLE_EVENTS=1 \
        SKIP_SSL_CERT_DOWNLOAD=1 FILESYSTEM_ROOT="$root/fs" \
        nohup "$venv/bin/python" -m localstack.runtime.main >"$log" 2>&1 &
        echo $! >"$pidfile"
    )
    for _ in $(seq 1 120); do
        if healthy; then
            say "ready"
            exports
            return
        fi
        if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            say "LocalStack exited; last lines of $log:"
            tail -20 "$log" >&2
            exit 1
        fi
        sleep 0.5
    done
    say "LocalStack did not become ready within 60 s; see $log"
    exit 1
}

stop() {
    if [ -f "$pidfile" ]; then
        pid=$(cat "$pidfile")
        pkill -TERM -P "$pid" 2>/dev/null || true
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
