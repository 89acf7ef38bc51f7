#!/usr/bin/env bash
# Regenerate the Python stubs in minisgl/v1/ from proto/minisgl/v1/*.proto (messages, gRPC
# stubs and typed .pyi files for both). Usage: bash scripts/gen_proto.sh [OUT_DIR]
# With OUT_DIR the stubs go there instead (CI uses this to check the committed ones are current).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
python -m grpc_tools.protoc -I proto \
    --python_out="$out" --grpc_python_out="$out" \
    --mypy_out="$out" --mypy_grpc_out="$out" \
    proto/minisgl/v1/*.proto
