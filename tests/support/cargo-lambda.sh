#!/usr/bin/env bash
# cargo-lambda (PyPI, pinned) in a virtualenv under .cache/, installed on first use, then run
# with the given arguments (`cargo-lambda.sh watch …` is `cargo lambda watch …`):
#
#   tests/support/cargo-lambda.sh watch --only-lambda-apis   # the local Lambda runtime API
#   tests/support/cargo-lambda.sh --install                  # install only, print the binary's path
#
# Only PyPI is contacted, and only on the first use. The wheel ships the `cargo-lambda`
# binary itself (no Zig is needed for `watch` and `invoke`).
set -euo pipefail
cd "$(dirname "$0")/../.."
version=1.9.2
venv=$PWD/.cache/cargo-lambda-$version
say() { echo "cargo-lambda.sh: $*" >&2; }
if ! [ -x "$venv/bin/cargo-lambda" ]; then
    say "installing cargo-lambda $version into $venv (first use only)"
    py=$(command -v python3.11 || command -v python3)
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "cargo-lambda==$version" >&2
fi
if [ "${1:-}" = "--install" ]; then
    echo "$venv/bin/cargo-lambda"
    exit 0
fi
exec "$venv/bin/cargo-lambda" lambda "$@"
