#!/usr/bin/env bash
# The whole test suite, as the README says: unit tests, doctests, the compile-fail suite,
# the SQL idempotency stores against SQLite and a throwaway PostgreSQL (Debian's package,
# installed and started on 127.0.0.1 by tests/support/postgres.sh), the DynamoDB store
# against moto server (tests/support/moto.sh), the behaviour suite on the embedded
# transport, then the behaviour suite and the AWS-specific tests against LocalStack
# (tests/support/emulator.sh, which also serves CloudFormation for the exported template),
# and beside it, on a second emulator and PostgreSQL of their own, the fault tests
# (tests/faults: the store stopped, the broker paused, workers and relays killed). The exports are checked by cfn-lint (PyPI) and the official AsyncAPI
# parser (npm), installed under .cache/ by tests/support/{cfn-lint,asyncapi}.sh. Every
# server and tool is installed on first use, listens on 127.0.0.1 only, and servers are
# stopped again at the end.
#
#   tests/run.sh              # everything
#   SKIP_AWS=1 tests/run.sh   # no AWS emulators: embedded transport, SQL stores only
set -euo pipefail
cd "$(dirname "$0")/.."

cleanup() {
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
}
trap cleanup EXIT

echo "== starting PostgreSQL on 127.0.0.1 (for the SQL idempotency store)"
postgres_env=$(tests/support/postgres.sh start)
eval "$postgres_env"
export SOURCEFLOW_TEST_REQUIRE_POSTGRES=1

if [ "${SKIP_AWS:-0}" != "1" ]; then
    echo "== starting moto server on 127.0.0.1 (DynamoDB, for the DynamoDB idempotency store)"
    moto_env=$(tests/support/moto.sh start)
    eval "$moto_env"
    export SOURCEFLOW_TEST_REQUIRE_DYNAMODB=1
fi

echo "== installing cfn-lint, @asyncapi/parser and cargo-lambda under .cache/ (first use only)"
tests/support/cfn-lint.sh --install >/dev/null
tests/support/cargo-lambda.sh --install >/dev/null
tests/support/asyncapi.sh --install

# tests/cli runs cfn-lint on the exported template and the AsyncAPI parser on the
# document (about 3 s together, once installed).
echo "== unit, doc, compile-fail, command-line, idempotency store and embedded-transport behaviour tests"
SOURCEFLOW_TEST_TOOLS=1 cargo test --workspace --all-features

# The orders example as a user runs it (built by the line above): the demo runs and exits
# 0, and its operator commands answer without a broker.
echo "== the orders example: the demo, then topology and export asyncapi"
orders=${CARGO_TARGET_DIR:-target}/debug/examples/orders
env -u AWS_ENDPOINT_URL SOURCEFLOW_TRANSPORT=memory "$orders" >/dev/null
topology=$("$orders" topology)
grep -q '^orders.fifo  *consumed' <<<"$topology"
asyncapi=$("$orders" export asyncapi)
grep -q '"asyncapi": "3.0.0"' <<<"$asyncapi"

echo "== the SQLite example: transactional handlers and the outbox, end to end (it checks its read model)"
cargo run -q -p sourceflow --all-features --example orders_sqlite

if [ "${SKIP_AWS:-0}" = "1" ]; then
    echo "== SKIP_AWS=1: not running the AWS suite"
    exit 0
fi

if [ ! -x tests/support/emulator.sh ]; then
    echo "== tests/support/emulator.sh not present: AWS suite not available in this build"
    exit 0
fi

echo "== building the emulator suites' test binaries"
cargo test -p sourceflow --all-features --no-run \
    --test behaviour --test transport --test aws --test lambda --test faults

echo "== starting the AWS API emulator on 127.0.0.1"
emulator_env=$(tests/support/emulator.sh start)
eval "$emulator_env"

# The fault tests stop their PostgreSQL and pause their emulator (SIGSTOP) on purpose, so
# they get servers of their own — a second emulator and a second PostgreSQL — and run one
# at a time, beside the AWS suite (which keeps the first ones).
echo "== starting a second emulator and a second PostgreSQL for the fault tests"
export FAULTS_PG_PORT=25433 FAULTS_PG_ROOT="$PWD/.cache/pg-faults" FAULTS_EMULATOR_PORT=4567
faults_env=$(
    SOURCEFLOW_TEST_POSTGRES_PORT=$FAULTS_PG_PORT SOURCEFLOW_TEST_POSTGRES_ROOT=$FAULTS_PG_ROOT \
        tests/support/postgres.sh start
    SOURCEFLOW_EMULATOR_PORT=$FAULTS_EMULATOR_PORT tests/support/emulator.sh start
)
faults_log=$(mktemp)
echo "== fault tests (store stopped, broker paused, workers and relays killed), one at a time, in the background"
(
    eval "$faults_env"
    export SOURCEFLOW_TEST_POSTGRES_PORT=$FAULTS_PG_PORT SOURCEFLOW_TEST_POSTGRES_ROOT=$FAULTS_PG_ROOT
    SOURCEFLOW_TEST_FAULTS=1 \
        cargo test -p sourceflow --all-features --test faults -- --test-threads=1
) >"$faults_log" 2>&1 &
faults_pid=$!

# tests/aws/exports.rs deploys the exported template to the emulator's CloudFormation
# (about 10 s for its two tests).
echo "== the behaviour suite again and the AWS-specific tests, against the emulator"
aws_status=0
SOURCEFLOW_TEST_TRANSPORT=aws SOURCEFLOW_TEST_AWS=1 \
    cargo test -p sourceflow --all-features --test behaviour --test transport --test aws --test lambda ||
    aws_status=$?

faults_status=0
wait "$faults_pid" || faults_status=$?
echo "== fault tests (output)"
cat "$faults_log"
rm -f "$faults_log"
if [ "$aws_status" != 0 ] || [ "$faults_status" != 0 ]; then
    echo "== failed: AWS suite exit $aws_status, fault tests exit $faults_status"
    exit 1
fi
