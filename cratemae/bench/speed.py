"""Time complete training steps of the training loop, after checking them.

A timed step is `TrainStep.step`, the training loop's own step (accum_steps 1, no clipping):
the task's loss under the precision's autocast, the all-ranks finite check, backward through
the `GradScaler`, the AdamW step of `configure_optimizers`, zero_grad. The task feeds one
random batch already on the device (no data loading), so the figure is what the model can
do, not the pipeline.

Before anything is timed, every path to be timed is run once on the timing batch and its
loss and gradients are compared with the reference (`cratemae.model.reference`, the
authors' computation written plainly, evaluated in float64); a path outside the tolerance
of its precision raises `CheckFailed` and no speed is reported.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator
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
from cratemae.distributed.device import choose_device
from cratemae.distributed.precision import resolve_precision
from cratemae.errors import BadInputError, CrateMAEError
from cratemae.model import CrateMAE, CrateMAEConfig, create_model, preset_config
from cratemae.model.reference import reference_forward
from cratemae.recipe import OptimSection
from cratemae.train.optim import configure_optimizers
from cratemae.train.run_dir import max_memory_gb
from cratemae.train.state import TrainState
from cratemae.train.step import TrainStep
from cratemae.train.task import Task

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
    if config.family == "vit":
        return _vit_forward_flops(config, n_enc, n_dec, patch)

    def mssa(n: int) -> float:  # U and W_o, then QK^T and AV over all heads
        return n * 4 * d * d + 4 * n * n * d

    ista = (2 if algorithm == "fast" else 6) * d * d
    encoder = config.depth * (mssa(n_enc) + n_enc * ista)
    decoder = config.decoder_depth * (mssa(n_dec) + n_dec * 2 * d * d)  # E, then MSSA'
    return float(L * 2 * d * patch + encoder + decoder + n_dec * 2 * d * patch)


def _vit_forward_flops(config: CrateMAEConfig, n_enc: int, n_dec: int, patch: int) -> float:
    """`forward_flops` of MAE's ViT: per block, qkv and output projections (4 d^2 per
    token), the MLP (2 r d^2) and QK^T and AV (2 N^2 d each); the decoder's input map."""
    d, dd, L, r = config.embed_dim, config.decoder_embed_dim, config.num_patches, config.mlp_ratio

    def block(n: int, w: int) -> float:
        return 2 * n * (4 + 2 * r) * w * w + 4 * n * n * w

    encoder = config.depth * block(n_enc, d)
    decoder = n_enc * 2 * d * dd + config.decoder_depth * block(n_dec, dd)
    return float(L * 2 * d * patch + encoder + decoder + n_dec * 2 * dd * patch)


# --- the step: the training loop's own ------------------------------------------------------
@dataclass
class _Fixed:
    """A batch as the loop sees one: images on the device, no bad samples."""

    images: torch.Tensor
    bad: int = 0


_BENCH_LR = 1e-4  # constant: the schedule is not what is timed


class _FixedBatches:
    """An endless epoch of the same batch."""

    def __init__(self, imgs: torch.Tensor) -> None:
        self.batch = _Fixed(imgs)

    def __iter__(self) -> Iterator[_Fixed]:
        while True:
            yield self.batch

    def bad_fraction_error(self, final: bool = False) -> None:
        return None


class _BenchTask(Task):
    """Pre-training's loss on the fixed batch, by the path being timed: "fast" (the model
    as the loop runs it, compiled with --compile, called as `MAETask.loss` calls it) or
    "reference" (`reference_forward` on the same parameters, always eager)."""

    def __init__(self, model: CrateMAE, imgs: torch.Tensor, mask_ratio: float) -> None:
        self.model, self.config = model, model.config.to_dict()
        self.batches, self.mask_ratio = _FixedBatches(imgs), mask_ratio
        self.path = "fast"

    def loss(self, model: nn.Module, batch: Any, micro: int) -> torch.Tensor:
        imgs = batch.images
        noise = torch.rand(imgs.shape[0], self.model.config.num_patches, device=imgs.device)
        return loss_functions(self.model, forward_model=model,
                              mask_ratio=self.mask_ratio)[self.path](imgs, noise)


def loss_functions(
    model: CrateMAE, *, forward_model: nn.Module | None = None, compile: bool = False,
    mask_ratio: float = 0.75,
) -> dict[str, LossFn]:
    """"fast": `forward_model` (default: the model, compiled if asked), called as
    `MAETask.loss` calls it; "reference": `reference_forward` on the model's parameters
    (always eager)."""
    if forward_model is None:
        forward_model = torch.compile(model) if compile else model

    def fast(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return forward_model(imgs, mask_ratio=mask_ratio, noise=noise).loss

    def reference(imgs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return reference_forward(model, imgs, mask_ratio, noise).loss

    return {"fast": fast, "reference": reference}


# --- timing ----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_step(trainer: TrainStep, timing: PathTiming) -> None:
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    finite = _step(trainer, timing.path)
    _sync(device)
    timing.step_seconds.append(time.perf_counter() - start)
    # CUDA: this path's peak allocation; CPU: the process's peak RSS (a high-water mark).
    timing.peak_memory_gib = max(timing.peak_memory_gib, max_memory_gb(device))
    if not finite:
        raise CrateMAEError(f"{timing.path}: non-finite loss during timing")


def _step(trainer: TrainStep, path: str) -> bool:
    task = trainer.task
    assert isinstance(task, _BenchTask)
    task.path = path
    return trainer.step(iter(task.batches), TrainState())


def _time_paths(trainer: TrainStep, timings: list[PathTiming], spec: BenchSpec) -> None:
    """Warm up each path, then time them step by step in turn (A, B, A, B, ...), so that a
    change in machine load affects every path alike."""
    for timing in timings:
        log.info("warm-up: %d step(s) of the %s path", spec.warmup, timing.path)
        for _ in range(spec.warmup):
            _step(trainer, timing.path)
    _sync(trainer.device)
    for i in range(spec.steps):
        for timing in timings:
            _timed_step(trainer, timing)
        log.info("timed step %d/%d: %s", i + 1, spec.steps, ", ".join(
            f"{t.path} {spec.batch_size / t.step_seconds[-1]:.1f} img/s" for t in timings))


# --- the whole benchmark ---------------------------------------------------------------------
def _check_spec(spec: BenchSpec) -> None:
    if spec.precision not in ("bf16", "fp16", "fp32"):
        raise BadInputError(f"--precision {spec.precision}: expected bf16, fp16 or fp32")
    for name in ("batch_size", "steps"):
        if getattr(spec, name) < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be at least 1")
    if spec.warmup < 0:
        raise BadInputError("--warmup must be 0 or more")
    try:
        family = preset_config(spec.model).family
    except ValueError as err:
        raise BadInputError(f"--model: {err}") from None
    if family == "vit":
        # The check compares with the authors' CRATE computation (cratemae.model.reference),
        # which MAE's ViT does not have.
        raise BadInputError(f"--model {spec.model}: bench checks every path against the "
                            "authors' CRATE-MAE computation; MAE's ViT has none yet")


def _build(spec: BenchSpec, device: torch.device) -> TrainStep:
    """The training step over the fixed batch: the spec's model, precision and compile,
    AdamW with the recipe defaults at a constant lr of 1e-4, and no data loading."""
    _check_spec(spec)
    torch.manual_seed(spec.seed)
    try:
        # --visible-only overrides the preset; without it, the preset's own encoder.
        visible = {"encoder_visible_only": True} if spec.visible_only else {}
        model = create_model(spec.model, img_size=spec.img_size, **visible)
    except ValueError as err:
        raise BadInputError(f"--model/--img-size: {err}") from None
    cfg = model.config
    imgs = torch.randn(spec.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size,
                       generator=torch.Generator().manual_seed(spec.seed)).to(device)
    task = _BenchTask(model.to(device), imgs, spec.mask_ratio)
    precision = resolve_precision(spec.precision, device)
    optimizer = configure_optimizers(model, OptimSection(), _BENCH_LR)
    return TrainStep(task, optimizer=optimizer, precision=precision, lr=lambda step: _BENCH_LR,
                     compile=spec.compile, device=device)


def run_bench(spec: BenchSpec) -> dict[str, Any]:
    """Check, then time, the fast path (and the reference with `spec.reference`).

    Returns a JSON-ready dict: the spec, the precision in effect, the checks, and per path
    images/s (median, min, max over the timed steps), step time, peak memory, GFLOP per
    image and achieved TFLOP/s; with the reference, `speedup` (ratio of the medians).
    """
    return _run(spec, _build(spec, choose_device(spec.device)))


def _run(spec: BenchSpec, trainer: TrainStep) -> dict[str, Any]:
    device, precision = trainer.device, trainer.precision
    task = trainer.task
    assert isinstance(task, _BenchTask)
    model, imgs = task.model, task.batches.batch.images
    model.train()
    loss_fns = loss_functions(model, forward_model=trainer.forward_model,
                              mask_ratio=spec.mask_ratio)
    paths = ["fast", "reference"] if spec.reference else ["fast"]
    cfg = model.config
    checks = check_paths(model, loss_fns, paths, imgs, precision, spec.mask_ratio)
    timings = [
        PathTiming(path, TRAIN_FLOPS_FACTOR * forward_flops(
            cfg, algorithm=path, mask_ratio=spec.mask_ratio)) for path in paths
    ]
    _time_paths(trainer, timings, spec)
    result: dict[str, Any] = {
        "spec": vars(spec) | {"precision_in_effect": precision.name},
        "device_name": _device_name(device),
        "precision_note": precision.note,
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
