#!/usr/bin/env bash
# The GPU acceptance run (issue 32): every CUDA path of the product on one GPU, in one call,
# at most 9 minutes on an H100/H200, nothing fetched. Seven rows, each with its own time
# budget, one line each (PASS / FAIL / NOT MET, figure and target), then $OUT/summary.json
# (default benchmarks/gpu-results, rehearsal /tmp/cratemae-rehearsal; benchmarks/NOTES.md,
# "The GPU acceptance run", says how to read it).
#   bash benchmarks/gpu_check.sh               # the seven rows on the GPU
#   bash benchmarks/gpu_check.sh 2 5           # some rows
#   bash benchmarks/gpu_check.sh --rehearse    # the same rows on the CPU at tiny sizes, ~1 min;
#                                              # CUDA-only checks print `needs CUDA`
# Exit 0 when every row passes (or needs CUDA in the rehearsal), 1 when one does not, 2 when
# the run cannot start. Row 1's speed rows alone: python benchmarks/gpu_check.py.
#
# The device image has torch, typer, rich and safetensors but not pydantic or tomli_w (the
# recipe schema imports them). Before the device call, once, here in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 tomli_w==1.2.0
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=570).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
[ -x .venv/bin/python ] && [ "$PY" = python3 ] && PY=.venv/bin/python
if ! "$PY" -c "import pydantic, tomli_w" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "error: pydantic/tomli_w missing: see the header" >&2; exit 2; }
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT=540  # the issue's 9 minutes, whatever the rows' budgets add up to
if [ "${1:-}" = --rehearse ]; then
  # Its runs and checkpoints stay out of the working tree unless OUT says otherwise.
  export OUT="${OUT:-${TMPDIR:-/tmp}/cratemae-rehearsal}"
  # Tiny steps on a shared CPU: one thread each is faster than two that wait on each other.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
  LIMIT=170
else
  export OUT="${OUT:-benchmarks/gpu-results}"
fi
if [ -e "$OUT" ] && [ ! -d "$OUT" ] || ! mkdir -p "$OUT" 2>/dev/null || [ ! -w "$OUT" ]; then
  echo "error: OUT=$OUT: not a directory this run can write; give a folder" >&2
  exit 2
fi
if [ "${1:-}" != "--rehearse" ]; then
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
timeout -k 10 "$LIMIT" "$PY" benchmarks/acceptance.py "$@" 2>&1 | tee "$OUT/summary.txt"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "FAIL: the whole run passed its ${LIMIT} s"
exit "$status"
