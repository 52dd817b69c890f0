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
. tests/support/pip-tool.sh
pip_tool cfn-lint 1.51.0 "${1:-}"
exec "$tool" "$@"
