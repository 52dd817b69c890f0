#!/usr/bin/env bash
# cfn-lint (PyPI, pinned) in a virtualenv under .cache/, installed on first use, then run
# with the given arguments:
#
#   tests/support/cfn-lint.sh template.json     # exit 0 when no error (warnings allowed)
#   tests/support/cfn-lint.sh --install         # install only, print the binary's path
#
# Only PyPI is contacted, and only on the first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=1.51.0
venv=$PWD/.cache/cfn-lint-$version
say() { echo "cfn-lint.sh: $*" >&2; }
if ! [ -x "$venv/bin/cfn-lint" ]; then
    say "installing cfn-lint $version into $venv (first use only)"
    py=$(command -v python3.11 || command -v python3)
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "cfn-lint==$version" >&2
fi
if [ "${1:-}" = "--install" ]; then
    echo "$venv/bin/cfn-lint"
    exit 0
fi
exec "$venv/bin/cfn-lint" "$@"
