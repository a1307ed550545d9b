#!/usr/bin/env bash
# Issue 8 on one GPU, in one go: about 5-8 minutes on an H100/H200, nothing fetched.
#   bash benchmarks/gpu_check.sh                                 # every row
#   bash benchmarks/gpu_check.sh full_compiled visible_compiled  # some rows
# Results: one JSON per row under $OUT (default benchmarks/gpu-results) and a summary that
# says MET / NOT met per target. CRATE-MAE-Base, batch 256, 224 px, bf16.
#
# The device image has torch, typer, rich and safetensors but not pydantic or tomli_w (the
# recipe schema imports them). Before the device call, once, here in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 tomli_w==1.2.0
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
if ! "$PY" -c "import pydantic, tomli_w" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "pydantic/tomli_w missing: see the header"; exit 2; }
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OUT="${OUT:-benchmarks/gpu-results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# 1. The fast path equals the reference (CPU tests, about 20 s).
timeout 90 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_model_fast_path.py 2>&1 | tail -n 2
# 2. The measurements; each row checks loss and gradients against the reference first.
timeout 420 "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/summary.txt"
