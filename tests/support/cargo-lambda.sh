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
. tests/support/pip-tool.sh
pip_tool cargo-lambda 1.9.2 "${1:-}"
exec "$tool" lambda "$@"
