#!/usr/bin/env bash
# The whole test suite, as the README says: unit tests, doctests, the compile-fail suite,
# the SQL idempotency stores against SQLite and a throwaway PostgreSQL (Debian's package,
# installed and started on 127.0.0.1 by tests/support/postgres.sh), the DynamoDB store
# against moto server (tests/support/moto.sh), the behaviour suite on the embedded
# transport, then the behaviour suite and the AWS-specific tests against LocalStack
# (tests/support/emulator.sh, which also serves CloudFormation for the exported template),
# and, on a second emulator and PostgreSQL of their own, the fault tests (tests/faults: the
# store stopped, the broker paused, workers and relays killed). The exports are checked by
# cfn-lint (PyPI) and the official AsyncAPI parser (npm), installed under .cache/ by
# tests/support/{cfn-lint,asyncapi}.sh. Every server and tool is installed on first use,
# listens on 127.0.0.1 only, and servers are stopped again at the end.
#
#   tests/run.sh              # everything
#   SKIP_AWS=1 tests/run.sh   # no AWS emulators: embedded transport, SQL stores only
#
# How it keeps to time on two cores: everything is compiled once, by one `cargo test
# --workspace --all-features --no-run` (every later cargo call has the same package
# selection and features, so nothing is compiled again); the installs run while it
# compiles; the compile-fail suite (one rustc at a time) runs beside the embedded-transport
# suites, and the fault tests beside the emulator suites. (Not the fault tests beside the
# embedded suites: their 1,000-job runs keep the second emulator busy, and moto, starved
# of CPU, then times out the DynamoDB store's connections.)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
logs=$(mktemp -d)
background=()

cleanup() {
    for pid in "${background[@]}"; do
        pkill -TERM -P "$pid" >/dev/null 2>&1 || true
        kill -TERM "$pid" >/dev/null 2>&1 || true
    done
    tests/support/postgres.sh stop >/dev/null 2>&1 || true
    if [ -n "${FAULTS_PG_PORT:-}" ]; then
        SOURCEFLOW_TEST_POSTGRES_PORT=$FAULTS_PG_PORT SOURCEFLOW_TEST_POSTGRES_ROOT=$FAULTS_PG_ROOT \
            tests/support/postgres.sh stop >/dev/null 2>&1 || true
    fi
    tests/support/moto.sh stop >/dev/null 2>&1 || true
    if [ -x tests/support/emulator.sh ]; then
        tests/support/emulator.sh stop >/dev/null 2>&1 || true
        if [ -n "${FAULTS_EMULATOR_PORT:-}" ]; then
            SOURCEFLOW_EMULATOR_PORT=$FAULTS_EMULATOR_PORT tests/support/emulator.sh stop >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$logs"
}
trap cleanup EXIT

aws=1
if [ "${SKIP_AWS:-0}" = "1" ] || [ ! -x tests/support/emulator.sh ]; then
    aws=0
fi

# Waits for a background step and prints its output; the step's exit status is returned.
finish() {
    local name=$1 pid=$2 status=0
    wait "$pid" || status=$?
    echo "== $name (output)"
    cat "$logs/$name"
    return "$status"
}

echo "== installing cfn-lint, @asyncapi/parser, cargo-lambda, moto and LocalStack under .cache/ (first use only), in the background"
(
    set -e
    tests/support/cfn-lint.sh --install >/dev/null
    tests/support/cargo-lambda.sh --install >/dev/null
    tests/support/asyncapi.sh --install
    if [ "$aws" = 1 ]; then
        tests/support/moto.sh install
        tests/support/emulator.sh install
    fi
) >"$logs/installs" 2>&1 &
installs=$!
background+=("$installs")

echo "== starting PostgreSQL on 127.0.0.1 (for the SQL idempotency store)"
postgres_env=$(tests/support/postgres.sh start)
eval "$postgres_env"
export SOURCEFLOW_TEST_REQUIRE_POSTGRES=1

echo "== building every test and example once"
cargo test --workspace --all-features --no-run

finish installs "$installs"

if [ "$aws" = 1 ]; then
    echo "== starting moto server on 127.0.0.1 (DynamoDB, for the DynamoDB idempotency store)"
    moto_env=$(tests/support/moto.sh start)
    eval "$moto_env"
    export SOURCEFLOW_TEST_REQUIRE_DYNAMODB=1

    # The fault tests stop their PostgreSQL and pause their emulator (SIGSTOP) on purpose,
    # so they get servers of their own — a second emulator and a second PostgreSQL — and
    # run one at a time, beside the emulator suites (which keep the first ones).
    echo "== starting the AWS API emulator, and a second one and a second PostgreSQL for the fault tests"
    export FAULTS_PG_PORT=25433 FAULTS_PG_ROOT="$PWD/.cache/pg-faults" FAULTS_EMULATOR_PORT=4567
    SOURCEFLOW_EMULATOR_PORT=$FAULTS_EMULATOR_PORT tests/support/emulator.sh start >"$logs/faults.env" &
    faults_emulator=$!
    emulator_env=$(tests/support/emulator.sh start)
    wait "$faults_emulator"
    SOURCEFLOW_TEST_POSTGRES_PORT=$FAULTS_PG_PORT SOURCEFLOW_TEST_POSTGRES_ROOT=$FAULTS_PG_ROOT \
        tests/support/postgres.sh start >>"$logs/faults.env"
fi

echo "== the compile-fail suite (trybuild), in the background"
cargo test --workspace --all-features --test ui >"$logs/compile-fail" 2>&1 &
compile_fail=$!
background+=("$compile_fail")

# tests/cli runs cfn-lint on the exported template and the AsyncAPI parser on the
# document (about 3 s together, once installed). `--exact --skip ui`: all but the
# compile-fail suite, which runs in the background.
echo "== unit, doc, command-line, idempotency store and embedded-transport behaviour tests"
SOURCEFLOW_TEST_TOOLS=1 cargo test --workspace --all-features -- --exact --skip ui

# The orders example as a user runs it (built by the line above): the demo runs and exits
# 0, and its operator commands answer without a broker.
echo "== the orders example: the demo, then topology and export asyncapi"
orders=$target/debug/examples/orders
env -u AWS_ENDPOINT_URL SOURCEFLOW_TRANSPORT=memory "$orders" >/dev/null
topology=$("$orders" topology)
grep -q '^orders.fifo  *consumed' <<<"$topology"
asyncapi=$("$orders" export asyncapi)
grep -q '"asyncapi": "3.0.0"' <<<"$asyncapi"

echo "== the SQLite example: transactional handlers and the outbox, end to end (it checks its read model)"
"$target/debug/examples/orders_sqlite"

status=0
if [ "$aws" = 1 ]; then
    # The emulator suites (about 6 min) beside the fault tests on their own emulator (about
    # as long). Not the behaviour suite beside the AWS-specific tests: the load then delays
    # the DynamoDB store's calls on moto past a claim's lease. tests/aws/exports.rs deploys
    # the exported template to the emulator's CloudFormation (about 10 s for its two tests).
    echo "== fault tests (store stopped, broker paused, workers and relays killed), one at a time, in the background"
    (
        # Its own servers' exports, not the shared emulator's (set only after this).
        source "$logs/faults.env"
        export SOURCEFLOW_TEST_POSTGRES_PORT=$FAULTS_PG_PORT SOURCEFLOW_TEST_POSTGRES_ROOT=$FAULTS_PG_ROOT
        SOURCEFLOW_TEST_FAULTS=1 \
            cargo test --workspace --all-features --test faults -- --test-threads=1
    ) >"$logs/faults" 2>&1 &
    faults=$!
    background+=("$faults")

    echo "== the behaviour suite again and the AWS-specific tests, against the emulator"
    eval "$emulator_env"
    export SOURCEFLOW_TEST_TRANSPORT=aws SOURCEFLOW_TEST_AWS=1
    # --no-fail-fast: a failure in one suite does not hide the others' results.
    cargo test --workspace --all-features --no-fail-fast \
        --test behaviour --test transport --test aws --test lambda || status=1
fi

finish compile-fail "$compile_fail" || status=1
if [ "$aws" = 1 ]; then
    finish faults "$faults" || status=1
else
    echo "== SKIP_AWS=1 (or no tests/support/emulator.sh): not running the AWS suite or the fault tests"
fi
if [ "$status" != 0 ]; then
    echo "== failed: see the output above"
    exit 1
fi
