#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests and benchmarks, from Debian's `postgresql`
# package (installed if missing), in .cache/pg of the repository, listening on
# 127.0.0.1:55432 only (trust authentication: it is a local test cluster).
#
#   eval "$(tests/support/postgres.sh start)"   # exports SOURCEFLOW_TEST_POSTGRES_URL
#   tests/support/postgres.sh status
#   tests/support/postgres.sh stop
#
# SOURCEFLOW_TEST_POSTGRES_PORT and SOURCEFLOW_TEST_POSTGRES_ROOT (the cluster's directory)
# run a second, separate cluster. The fault tests stop and restart the server with this
# script (`stop`, then `start`), with the same environment.
#
# `start` is idempotent: it reuses the cluster and the database if they exist and leaves a
# running server alone. Logs go to stderr; stdout carries only the export line.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PORT=${SOURCEFLOW_TEST_POSTGRES_PORT:-55432}
DB=sourceflow_test
URL="postgres://postgres@127.0.0.1:${PORT}/${DB}"

log() { echo "postgres.sh: $*" >&2; }

is_root() { [ "$(id -u)" = 0 ]; }

# The newest installed server's bin directory, or nothing.
pg_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; fi
}

# PostgreSQL refuses to run as root: run its tools as the `postgres` user then.
as_pg() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Where the cluster lives: .cache/pg, unless the `postgres` user cannot reach it (a
# checkout in a private directory), then a directory in /tmp named after the checkout.
cluster_root() {
    local root="${SOURCEFLOW_TEST_POSTGRES_ROOT:-$REPO/.cache/pg}"
    if is_root && id postgres >/dev/null 2>&1; then
        mkdir -p "$root"
        chown postgres: "$root"
        if ! runuser -u postgres -- test -w "$root"; then
            root="${TMPDIR:-/tmp}/sourceflow-pg-$(printf '%s' "$REPO" | sha1sum | cut -c1-12)"
            mkdir -p "$root"
            chown postgres: "$root"
            chmod 700 "$root"
        fi
    else
        mkdir -p "$root"
    fi
    echo "$root"
}

install() {
    if [ -n "$(pg_bin)" ]; then return; fi
    if ! is_root; then
        log "PostgreSQL is not installed; run as root (apt-get install -y postgresql) first"
        exit 1
    fi
    log "installing Debian's postgresql package"
    apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql >&2
    if [ -z "$(pg_bin)" ]; then
        log "postgresql installed, but no /usr/lib/postgresql/*/bin/initdb found"
        exit 1
    fi
}

running() {
    local bin=$1 data=$2
    [ -f "$data/PG_VERSION" ] && as_pg "$bin/pg_ctl" status -D "$data" >/dev/null 2>&1
}

start() {
    install
    local bin root data sock
    bin=$(pg_bin)
    root=$(cluster_root)
    data="$root/data"
    sock="$root/sock"
    as_pg mkdir -p "$sock"
    if [ ! -f "$data/PG_VERSION" ]; then
        log "creating a cluster in $data"
        as_pg "$bin/initdb" -D "$data" -U postgres -E UTF8 --locale=C \
            --auth-local=trust --auth-host=trust >&2
    fi
    if running "$bin" "$data"; then
        log "already running on 127.0.0.1:$PORT"
    else
        log "starting on 127.0.0.1:$PORT (log: $root/server.log)"
        if ! as_pg "$bin/pg_ctl" start -D "$data" -l "$root/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $PORT -k $sock" >&2; then
            log "the server did not start; its log:"
            tail -n 30 "$root/server.log" >&2 || true
            exit 1
        fi
    fi
    local i
    for i in $(seq 1 60); do
        if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres; then break; fi
        if [ "$i" = 60 ]; then
            log "not ready after 30 s"
            exit 1
        fi
        sleep 0.5
    done
    local psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres)
    if [ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
        log "creating database $DB"
        "${psql[@]}" -c "CREATE DATABASE $DB" >&2
    fi
    echo "export SOURCEFLOW_TEST_POSTGRES_URL=$URL"
}

stop() {
    local bin root
    bin=$(pg_bin)
    if [ -z "$bin" ]; then
        log "PostgreSQL is not installed; nothing to stop"
        return
    fi
    root=$(cluster_root)
    if running "$bin" "$root/data"; then
        as_pg "$bin/pg_ctl" stop -D "$root/data" -m fast -w >&2
        log "stopped"
    else
        log "not running"
    fi
}

status() {
    local bin root
    bin=$(pg_bin)
    if [ -z "$bin" ]; then
        echo "not installed"
        exit 3
    fi
    root=$(cluster_root)
    if running "$bin" "$root/data"; then
        echo "running on 127.0.0.1:$PORT ($root/data): $URL"
    else
        echo "stopped"
        exit 3
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
