"""Time complete training steps of the real training path, after checking them.

A step is what `Trainer._train_step` runs for one micro-batch (accum_steps 1, no clipping):
the model's forward and masked-patch loss under `Precision.autocast()`, backward through the
`GradScaler`, the AdamW step of `build_adamw`, zero_grad. The input is random and already on
the device (no data loading), so the figure is what the model can do, not the pipeline.

Before anything is timed, every path to be timed is run once on the timing batch and its
loss and gradients are compared with the reference (`cratemae.model.reference`, the
authors' computation written plainly, evaluated in float64); a path outside the tolerance
of its precision raises `CheckFailed` and no speed is reported.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cratemae.bench.check import (
    TOLERANCES,
    CheckFailed,
    LossFn,
    PathCheck,
    Tolerance,
    check_paths,
)
from cratemae.distributed.precision import Precision, resolve_precision
from cratemae.errors import BadInputError, CrateMAEError
from cratemae.model import CrateMAE, CrateMAEConfig, create_model
from cratemae.model.reference import reference_forward
from cratemae.recipe import OptimSection
from cratemae.train.optim import build_adamw
from cratemae.train.run_dir import max_memory_gb

__all__ = [
    "TOLERANCES",
    "TRAIN_FLOPS_FACTOR",
    "BenchSpec",
    "CheckFailed",
    "PathCheck",
    "PathTiming",
    "Tolerance",
    "check_paths",
    "forward_flops",
    "loss_functions",
    "run_bench",
]

log = logging.getLogger("cratemae")

# Backward costs about twice the forward's matrix products (input and weight gradients).
TRAIN_FLOPS_FACTOR = 3


@dataclass(frozen=True, kw_only=True)
class BenchSpec:
    """What `cratemae bench` times (its options, resolved)."""

    model: str = "crate_mae_base"
    img_size: int = 224
    batch_size: int = 256
    steps: int = 20
    warmup: int = 5
    precision: str = "bf16"
    compile: bool = False
    visible_only: bool = False
    device: str = "cuda"
    reference: bool = False
    mask_ratio: float = 0.75
    seed: int = 0


@dataclass
class PathTiming:
    path: str
    flops_per_image: float  # training step, this path's algorithm
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_gib: float = 0.0

    def summary(self, batch_size: int) -> dict[str, Any]:
        rates = [batch_size / s for s in self.step_seconds]
        median = statistics.median(rates)
        return {
            "images_per_s": median,
            "images_per_s_min": min(rates),
            "images_per_s_max": max(rates),
            "step_ms_median": 1e3 * batch_size / median,
            "peak_memory_gib": self.peak_memory_gib,
            "gflop_per_image": self.flops_per_image / 1e9,
            "tflop_per_s": median * self.flops_per_image / 1e12,
        }


# --- work per image --------------------------------------------------------------------------
def forward_flops(
    config: CrateMAEConfig, *, algorithm: str = "fast", mask_ratio: float = 0.75
) -> float:
    """Matrix-product FLOPs (2 per multiply-add) of one image's forward pass.

    `algorithm` "fast": one-matmul ISTA; "reference": the authors' three-matmul ISTA. Counts
    the patch embedding, every layer's projections and attention products (QK^T and AV,
    2*N^2*d each) and the prediction head; leaves out norms, softmax and elementwise work,
    and the once-per-step (d, d) product D^T D (2*d^3 per layer, shared by the batch).
    """
    d, L = config.embed_dim, config.num_patches
    patch = config.patch_size**2 * config.in_chans
    keep = int(L * (1 - mask_ratio)) if config.encoder_visible_only else L
    n_enc, n_dec = 1 + keep, 1 + L  # tokens with CLS

    def mssa(n: int) -> float:  # U and W_o, then QK^T and AV over all heads
        return n * 4 * d * d + 4 * n * n * d

    ista = (2 if algorithm == "fast" else 6) * d * d
    encoder = config.depth * (mssa(n_enc) + n_enc * ista)
    decoder = config.decoder_depth * (mssa(n_dec) + n_dec * 2 * d * d)  # E, then MSSA'
    return float(L * 2 * d * patch + encoder + decoder + n_dec * 2 * d * patch)


# --- the step, as the trainer runs it --------------------------------------------------------
@dataclass
class _Parts:
    model: CrateMAE
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    device: torch.device




def _training_step(parts: _Parts, loss_fn: LossFn, imgs: torch.Tensor) -> torch.Tensor:
    """One optimizer step as `Trainer._train_step` / `_optimizer_step` run it."""
    noise = torch.rand(imgs.shape[0], parts.model.config.num_patches, device=imgs.device)
    with parts.precision.autocast():
        loss = loss_fn(imgs, noise)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def loss_functions(
    model: CrateMAE, *, compile: bool = False, mask_ratio: float = 0.75
) -> dict[str, LossFn]:
    """"fast": the model's forward (compiled if asked), called as `MAETask.loss` calls it;
    "reference": `reference_forward` on the same parameters (always eager)."""
    forward_model: nn.Module = torch.compile(model) if compile else model

    def fast(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return forward_model(imgs, mask_ratio=mask_ratio, noise=noise).loss

    def reference(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return reference_forward(model, imgs, mask_ratio, noise).loss

    return {"fast": fast, "reference": reference}


# --- timing ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(parts: _Parts, loss_fn: LossFn, imgs: torch.Tensor, timing: PathTiming) -> None:
    device = parts.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    loss = _training_step(parts, loss_fn, imgs)
    _sync(device)
    timing.step_seconds.append(time.perf_counter() - start)
    # CUDA: this path's peak allocation; CPU: the process's peak RSS (a high-water mark).
    timing.peak_memory_gib = max(timing.peak_memory_gib, max_memory_gb(device))
    if not torch.isfinite(loss):
        raise CrateMAEError(f"{timing.path}: non-finite loss during timing")


def _time_paths(
    parts: _Parts, loss_fns: dict[str, LossFn], timings: list[PathTiming], imgs: torch.Tensor,
    spec: BenchSpec,
) -> None:
    """Warm up each path, then time them step by step in turn (A, B, A, B, ...), so that a
    change in machine load affects every path alike."""
    for timing in timings:
        log.info("warm-up: %d step(s) of the %s path", spec.warmup, timing.path)
        for _ in range(spec.warmup):
            _training_step(parts, loss_fns[timing.path], imgs)
    _sync(parts.device)
    for i in range(spec.steps):
        for timing in timings:
            _timed_step(parts, loss_fns[timing.path], imgs, timing)
        log.info("timed step %d/%d: %s", i + 1, spec.steps, ", ".join(
            f"{t.path} {imgs.shape[0] / t.step_seconds[-1]:.1f} img/s" for t in timings))


# --- the whole benchmark ---------------------------------------------------------------------
def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"--device {name}: expected cuda or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise BadInputError(f"--device {name}: expected cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return device


def _build(spec: BenchSpec, device: torch.device) -> _Parts:
    if spec.precision not in ("bf16", "fp16", "fp32"):
        raise BadInputError(f"--precision {spec.precision}: expected bf16, fp16 or fp32")
    for name in ("batch_size", "steps"):
        if getattr(spec, name) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be at least 1")
    if spec.warmup < 0:
        raise BadInputError("--warmup must be 0 or more")
    torch.manual_seed(spec.seed)
    try:
        model = create_model(spec.model, img_size=spec.img_size,
                             encoder_visible_only=spec.visible_only)
    except ValueError as err:
        raise BadInputError(f"--model/--img-size: {err}") from None
    model = model.to(device).train()
    precision = resolve_precision(spec.precision, device)
    if precision.note:
        log.info(precision.note.replace("run.precision", "--precision"))
    optimizer = build_adamw(model, OptimSection(), lr=1e-4)  # the recipe defaults
    return _Parts(model, optimizer, precision.make_scaler(), precision, device)


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Check, then time, the fast path (and the reference with `spec.reference`).

    Returns a JSON-ready dict: the spec, the precision in effect, the checks, and per path
    images/s (median, min, max over the timed steps), step time, peak memory, GFLOP per
    image and achieved TFLOP/s; with the reference, `speedup` (ratio of the medians).
    """
    device = _device(spec.device)
    parts = _build(spec, device)
    loss_fns = loss_functions(parts.model, compile=spec.compile, mask_ratio=spec.mask_ratio)
    paths = ["fast", "reference"] if spec.reference else ["fast"]
    cfg = parts.model.config
    imgs = torch.randn(spec.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size,
                       generator=torch.Generator().manual_seed(spec.seed)).to(device)
    checks = check_paths(parts.model, loss_fns, paths, imgs, parts.precision, spec.mask_ratio)
    timings = [
        PathTiming(path, TRAIN_FLOPS_FACTOR * forward_flops(
            cfg, algorithm=path, mask_ratio=spec.mask_ratio)) for path in paths
    ]
    _time_paths(parts, loss_fns, timings, imgs, spec)
    result: dict[str, Any] = {
        "spec": vars(spec) | {"precision_in_effect": parts.precision.name},
        "device_name": _device_name(device),
        "precision_note": parts.precision.note,
        "memory_kind": "max allocated (CUDA)" if device.type == "cuda" else "peak RSS (process)",
        "flop_count": f"matrix products only, training = {TRAIN_FLOPS_FACTOR} x forward",
        "checks": {c.path: asdict(c) for c in checks},
        "paths": {t.path: t.summary(spec.batch_size) for t in timings},
    }
    if spec.reference:
        fast, ref = result["paths"]["fast"], result["paths"]["reference"]
        result["speedup"] = fast["images_per_s"] / ref["images_per_s"]
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s)"
