# Sourced by the scripts that run a pinned PyPI tool (cfn-lint.sh, cargo-lambda.sh):
# `pip_tool NAME VERSION` installs NAME==VERSION into a virtualenv under .cache/ on first
# use (only PyPI is contacted, and only then) and sets `tool` to its binary's path.
# `--install` as the script's first argument then prints that path and exits.
pip_tool() {
    local name=$1 version=$2
    local venv=$PWD/.cache/$name-$version
    if ! [ -x "$venv/bin/$name" ]; then
        echo "$name: installing $name $version into $venv (first use only)" >&2
        local py
        py=$(command -v python3.11 || command -v python3)
        rm -rf "$venv"
        "$py" -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$name==$version" >&2
    fi
    tool=$venv/bin/$name
    if [ "${3:-}" = "--install" ]; then
        echo "$tool"
        exit 0
    fi
}
