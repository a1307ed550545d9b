"""Multinomial logistic regression on fixed features, fitted by full-batch L-BFGS.

minimise  mean_i CE(W^T x_i + b, y_i) + wd/2 * ||W||^2   over W (d, C), b (C,)
with x standardised by the fit set's mean and standard deviation. Convex, so each fit is
deterministic given its inputs; the weight-decay grid is split over the ranks and the
scores gathered, which gives the same choice as one process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cratemae.distributed import dist
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.eval.classify import topk_correct

__all__ = ["FitStopped", "LinearFit", "best_of_grid", "fit_logreg", "holdout_split",
           "select_weight_decay"]


log = logging.getLogger("cratemae")


class FitStopped(Exception):
    """A fit left at an L-BFGS evaluation because a stop signal came (`PreemptionFlag`)."""


@dataclass(frozen=True)
class LinearFit:
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)
    weight: torch.Tensor  # (d, C)
    bias: torch.Tensor  # (C,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, C)."""
        z = (x.to(self.weight) - self.mean) / self.std
        return z @ self.weight + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Top-1 and top-5 (percent)."""
        logits, y = self.logits(x), y.to(self.weight.device)
        return (100 * topk_correct(logits, y, 1).double().mean().item(),
                100 * topk_correct(logits, y, 5).double().mean().item())


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 on CPUs (cheap there, and tight convergence); float32 on GPUs.
    return torch.float64 if device.type == "cpu" else torch.float32


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
               max_iter: int, device: torch.device,
               stop: PreemptionFlag | None = None) -> LinearFit:
    """Fit on (N, d) features and (N,) labels; `FitStopped` as soon as `stop` has seen a
    stop signal (checked at every loss evaluation)."""
    dtype = _work_dtype(device)
    x, y = x.to(device, dtype), y.to(device)
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        if stop is not None and stop.requested:
            raise FitStopped
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LinearFit(mean, std, w.detach(), b.detach())


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, held out) of n samples; the held-out part is `fraction` of them."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = max(1, round(n * fraction))
    return order[k:].sort().values, order[:k].sort().values


def select_weight_decay(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                        grid: Sequence[float], fraction: float, seed: int, max_iter: int,
                        device: torch.device, stop: PreemptionFlag | None = None
                        ) -> list[float]:
    """Held-out top-1 (percent) for each weight decay in `grid`; rank r fits grid[r::world]."""
    fit_idx, held_idx = holdout_split(len(y), fraction, seed)
    info = dist.get_dist_info()
    scores = torch.zeros(len(grid), dtype=torch.float64)
    for i in range(info.rank, len(grid), info.world_size):
        fit = fit_logreg(x[fit_idx], y[fit_idx], num_classes, grid[i], max_iter, device, stop)
        scores[i] = fit.accuracy(x[held_idx], y[held_idx])[0]
    return dist.all_reduce_sum(scores.to(dist.comm_device())).cpu().tolist()


def best_of_grid(grid: Sequence[float], scores: list[float]) -> int:
    """The index of the best held-out score (ties: the first), warned about when it lies at
    an edge of the grid (`_warn_at_edge`)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    _warn_at_edge(tuple(grid), scores, best)
    return best


def _warn_at_edge(grid: tuple[float, ...], scores: list[float], best: int) -> None:
    """Warn when the chosen weight decay is the grid's smallest or largest and beats its
    neighbour: the best one may lie beyond the grid."""
    ordered = sorted(range(len(grid)), key=lambda i: grid[i])
    pos = ordered.index(best)
    if len(grid) < 2 or pos not in (0, len(grid) - 1):
        return
    neighbour = ordered[1] if pos == 0 else ordered[-2]
    if scores[best] > scores[neighbour] and dist.is_main_process():
        side = "smallest" if pos == 0 else "largest"
        log.warning("the chosen weight decay %g is the %s of probe.weight_decays %s and "
                    "beats its neighbour (%.2f%% vs %.2f%%): a better one may lie beyond; "
                    "extend the grid (--set 'probe.weight_decays=[...]')", grid[best], side,
                    list(grid), scores[best], scores[neighbour])
