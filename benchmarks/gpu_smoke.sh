#!/usr/bin/env bash
# Run on the GPU machine (device tool): GPU tests, then the offline benchmarks given as arguments.
# Wheels for what the image lacks travel in .whl/ (pytest and its pure-Python dependencies).
set -uo pipefail
export PYTHONPATH="/tmp/wheels:$PWD"
pip install -q --no-deps --target /tmp/wheels .whl/*.whl >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
