"""Run the issue-8 GPU measurements in one process and print them against the targets.

Called by gpu_check.sh; usable without installing the package (`PYTHONPATH=.`). Each row is
one `cratemae bench` run (the same `run_bench`), checked against the reference before it is
timed; a row whose check fails is reported as such and the others still run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from cratemae.bench.speed import BenchSpec, run_bench
from cratemae.errors import CrateMAEError

BASE = dict(model="crate_mae_base", img_size=224, batch_size=256, precision="bf16")
# (name, spec overrides, target images/s, target peak GiB); the order puts the targets first.
ROWS = [
    ("full_compiled", dict(compile=True, steps=20, warmup=5), 6000, 16.0),
    ("visible_compiled", dict(compile=True, visible_only=True, steps=20, warmup=5), 8000, None),
    ("full_eager_vs_reference", dict(reference=True, steps=10, warmup=3), None, None),
    ("visible_eager", dict(visible_only=True, steps=10, warmup=3), None, None),
]


def main() -> int:
    out = Path(os.environ.get("OUT") or "benchmarks/gpu-results")
    out.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    failed = False
    for name, overrides, target, memory in ROWS:
        if only and name not in only:
            continue
        start = time.monotonic()
        try:
            result = run_bench(BenchSpec(**BASE, **overrides, device="cuda"))
        except CrateMAEError as err:
            print(f"{name}: FAILED: {err}", flush=True)
            failed = True
            continue
        result["wall_s"] = time.monotonic() - start
        (out / f"{name}.json").write_text(json.dumps(result, indent=1))
        print(_line(name, result, target, memory), flush=True)
        torch.cuda.empty_cache()
    return 1 if failed else 0


def _line(name: str, result: dict, target: float | None, memory: float | None) -> str:
    fast, check = result["paths"]["fast"], result["checks"]["fast"]
    rate, gib = fast["images_per_s"], fast["peak_memory_gib"]
    parts = [
        f"{name}: {rate:,.0f} img/s (min {fast['images_per_s_min']:,.0f}, "
        f"max {fast['images_per_s_max']:,.0f}), {gib:.1f} GiB, "
        f"{fast['tflop_per_s']:.0f} TFLOP/s, check grad err {check['grad_rel_err']:.1e} "
        f"(allowed {check['allowed_grad']:.1e}), {result['wall_s']:.0f} s"
    ]
    if target is not None:
        parts.append(f"target >= {target:,} img/s: {'MET' if rate >= target else 'NOT met'}")
    if memory is not None:
        parts.append(f"target <= {memory} GiB: {'MET' if gib <= memory else 'NOT met'}")
    if "speedup" in result:
        ref = result["paths"]["reference"]
        parts.append(f"reference {ref['images_per_s']:,.0f} img/s, ratio {result['speedup']:.2f}x")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
