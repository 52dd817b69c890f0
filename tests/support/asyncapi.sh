#!/usr/bin/env bash
# Validates AsyncAPI documents with the official parser (@asyncapi/parser from npm,
# pinned), installed on first use under .cache/ and run with the machine's Node.js:
#
#   tests/support/asyncapi.sh document.json   # exit 0 when the parser reports no error
#   tests/support/asyncapi.sh --install       # install only
#
# Every diagnostic is printed (severity 0 = error, 1 = warning, 2 = information, 3 = hint);
# only errors fail. Only the npm registry is contacted, and only on the first use.
set -euo pipefail
cd "$(dirname "$0")/../.."
version=3.6.3
dir=$PWD/.cache/asyncapi-parser-$version
say() { echo "asyncapi.sh: $*" >&2; }
if ! [ -f "$dir/node_modules/@asyncapi/parser/package.json" ]; then
    say "installing @asyncapi/parser $version into $dir (first use only)"
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && echo '{"name":"sourceflow-asyncapi-check","private":true}' >package.json \
        && npm install --silent --no-audit --no-fund --ignore-scripts "@asyncapi/parser@$version" >&2)
fi
if [ "${1:-}" = "--install" ]; then
    exit 0
fi
cat >"$dir/validate.mjs" <<'JS'
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";
const parser = new Parser();
let failed = false;
for (const file of process.argv.slice(2)) {
  const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"));
  for (const d of diagnostics) {
    console.log(`${file}: severity ${d.severity} ${d.code}: ${d.message} at ${JSON.stringify(d.path)}`);
  }
  const errors = diagnostics.filter((d) => d.severity === 0);
  if (errors.length > 0 || document === undefined) {
    console.log(`${file}: ${errors.length} error(s)`);
    failed = true;
  } else {
    console.log(`${file}: valid AsyncAPI ${document.version()}, ${document.channels().length} channel(s), ${document.operations().length} operation(s), ${document.allMessages().length} message(s)`);
  }
}
process.exit(failed ? 1 : 0);
JS
exec node "$dir/validate.mjs" "$@"
