#!/usr/bin/env bash
# Run on the GPU machine (device tool): GPU tests, then the offline benchmarks given as arguments.
# Wheels for what the image lacks travel in .whl/ (name it in the call's `carry`): pytest and its
# pure-Python dependencies, and for `minisgl serve` / the online benchmark grpcio 1.85.1 (the
# stubs need >= 1.85.1; the image has 1.84), grpcio-health-checking, grpcio-reflection, pyzmq,
# msgspec. Fetch them here with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 --no-deps -d .whl pytest iniconfig pluggy packaging \
#     grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 pyzmq msgspec
set -uo pipefail
export PYTHONPATH="/tmp/wheels:$PWD"
pip install -q --no-deps --target /tmp/wheels .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
