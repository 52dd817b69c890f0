#!/usr/bin/env bash
# Deploys or deletes a CloudFormation stack with boto3 (from the emulator's virtualenv,
# where LocalStack brings it), against AWS_ENDPOINT_URL — the emulator, or real AWS when
# it is unset:
#
#   tests/support/stack.sh deploy <stack name> <template.json>   # waits; exit 1 on failure
#   tests/support/stack.sh delete <stack name>                   # does not wait
#
# stdout: the stack's outputs as `key=value` lines after a deploy. On failure the stack's
# failed events go to stderr.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=$PWD/.cache/emulator-venv/bin/python
if ! [ -x "$python" ]; then
    tests/support/emulator.sh start >/dev/null  # installs the virtualenv
fi
exec "$python" - "$@" <<'PY'
import json, sys, time
import boto3

cfn = boto3.client("cloudformation")
action, name = sys.argv[1], sys.argv[2]
if action == "delete":
    cfn.delete_stack(StackName=name)
    sys.exit(0)
with open(sys.argv[3]) as f:
    body = f.read()
cfn.create_stack(StackName=name, TemplateBody=body, Capabilities=["CAPABILITY_IAM"])
deadline = time.time() + 300
while True:
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    status = stack["StackStatus"]
    if status == "CREATE_COMPLETE":
        for o in stack.get("Outputs", []):
            print(f'{o["OutputKey"]}={o["OutputValue"]}')
        sys.exit(0)
    if not status.endswith("_IN_PROGRESS") or time.time() > deadline:
        print(f"stack {name}: {status}", file=sys.stderr)
        for e in cfn.describe_stack_events(StackName=name)["StackEvents"]:
            if "FAILED" in e.get("ResourceStatus", ""):
                print(f'  {e["LogicalResourceId"]}: {e.get("ResourceStatusReason", "")}', file=sys.stderr)
        sys.exit(1)
    time.sleep(0.5)
PY
