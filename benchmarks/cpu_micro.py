"""Micro-benchmarks behind benchmarks/NOTES.md: one piece of the training step, A and B
interleaved in one process, median of several repeats (CPU; noisy on a shared machine).

    .venv/bin/python benchmarks/cpu_micro.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cratemae.model import create_model


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 9) -> dict[str, float]:
    """Median milliseconds of each function, run A, B, A, B, ... after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * statistics.median(t), 1) for name, t in times.items()}


def attention() -> dict[str, float]:
    """MSSA's attention, forward + backward: (B, K, N, p) = (16, 6, 197, 64), tiny at 224."""
    u = torch.randn(16, 6, 197, 64, requires_grad=True)

    def sdpa() -> None:
        F.scaled_dot_product_attention(u, u, u).sum().backward()

    def explicit() -> None:
        a = torch.softmax(u @ u.transpose(-2, -1) * 64**-0.5, dim=-1)
        (a @ u).sum().backward()

    return interleaved({"sdpa": sdpa, "explicit": explicit})


def ista() -> dict[str, float]:
    """One ISTA step, forward + backward: y (16, 197, 384)."""
    d = 384
    y = torch.randn(16, 197, d, requires_grad=True)
    D = torch.nn.Parameter(0.05 * torch.randn(d, d))

    def one_matmul() -> None:
        M = 0.1 * (D - D.t() @ D)
        F.relu(y + y @ M - 0.05).sum().backward()

    def three_matmuls() -> None:
        g1 = F.linear(F.linear(y, D), D.t())
        g2 = F.linear(y, D.t())
        F.relu(y + (0.1 * (g2 - g1) - 0.05)).sum().backward()

    return interleaved({"one_matmul": one_matmul, "three_matmuls": three_matmuls})


def adamw() -> dict[str, float]:
    """One AdamW step over crate_mae_tiny's parameters (11.3M, 101 tensors)."""
    model = create_model("crate_mae_tiny")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    kinds = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opts = {k: torch.optim.AdamW(model.parameters(), lr=1e-4, **kw) for k, kw in kinds.items()}
    return interleaved({k: o.step for k, o in opts.items()})


if __name__ == "__main__":
    print(f"{torch.get_num_threads()} thread(s)")
    for bench in (attention, ista, adamw):
        print(bench.__name__, "ms:", bench())
