"""Peak accelerator memory of one training step per rank, estimated without an accelerator.

    peak ~= weights + weight average + gradients + optimizer state + activations(batch)

Weights, their average and the optimizer's moments are fp32 and counted exactly from the
parameters (AdamW: 2 moments per trainable parameter; SGD, LARS: 1). Gradients exist only
for trainable parameters (fp32). Activations are measured, not modelled: one forward pass
and loss of the real model at batches of 2 and 4 images, under the recipe's autocast dtype
(the CPU's autocast), counting the bytes of every tensor autograd saves for the backward
(each storage once: the bf16 copies of the weights, attention outputs, norms' inputs...).
The pass runs on fake tensors (torch's `FakeTensorMode`, what `torch.compile` traces
with): every shape, dtype and storage as the real pass makes them, and no arithmetic, so
a ViT-L is measured in seconds on a login node. The
difference of the two passes is the cost per image, the rest the fixed cost; both are
linear in the batch. With `run.grad_checkpointing`, each block keeps only its input and one
block's activations live again during the backward: fixed + per block input + the largest
block's own.

Error bars: the sum leaves out the backward's temporaries (up to about +10% measured) and
counts gradients of the last layers together with activations of the first, which are
never alive at full size together (up to about -15% when the state dominates); the CPU's
attention kernel saves what CUDA's flash kernel saves. Real peaks of a CPU step of small
models fall within 0.87x to 1.11x of the estimate, hence `ERROR` (tests/test_dry_run.py
holds a model to it). On a GPU, allocator rounding and cuBLAS workspaces add a few percent,
and the CUDA context (about 0.5 GiB, outside torch's figure) comes on top.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["ERROR", "MemoryEstimate", "fake_model", "measure_activations", "state_bytes"]

# The relative error the estimate is given with, both ways.
ERROR = 0.25
# Optimizer state per trainable parameter, in fp32 tensors.
_MOMENTS = {"adamw": 2, "sgd": 1, "lars": 1}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Forward = Callable[[nn.Module, int], torch.Tensor]  # (model, batch) -> loss


@dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes of one forward pass: `fixed + per_image * batch`, and with
    gradient checkpointing `fixed_ckpt + per_image_ckpt * batch`."""

    fixed: int
    per_image: int
    fixed_ckpt: int
    per_image_ckpt: int

    def at(self, batch: int, checkpointing: bool) -> int:
        if checkpointing:
            return self.fixed_ckpt + self.per_image_ckpt * batch
        return self.fixed + self.per_image * batch


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of one rank's peak memory at `batch` images per micro-batch (bytes)."""

    weights: int
    average: int  # the weight EMA, when the task keeps one
    grads: int
    optimizer: int
    activations: Activations
    batch: int
    precision: str

    def state(self) -> int:
        """What does not grow with the batch."""
        return self.weights + self.average + self.grads + self.optimizer

    def total(self, checkpointing: bool, batch: int | None = None) -> int:
        return self.state() + self.activations.at(self.batch if batch is None else batch,
                                                  checkpointing)

    def largest_batch(self, budget: float, checkpointing: bool) -> int:
        """The largest micro-batch whose estimate fits `budget` bytes (0: none)."""
        a = self.activations
        fixed, per = ((a.fixed_ckpt, a.per_image_ckpt) if checkpointing
                      else (a.fixed, a.per_image))
        room = budget - self.state() - fixed
        return max(0, math.floor(room / per)) if per > 0 else 0


def state_bytes(model: nn.Module, optimizer: str, *, average: bool = False
                ) -> tuple[int, int, int, int]:
    """(weights, average, gradients, optimizer state) in bytes: fp32 parameters, as the
    training loop keeps them (autocast casts copies, which count as activations)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params) * 4
    trainable = sum(p.numel() for p in params if p.requires_grad) * 4
    return total, total if average else 0, trainable, _MOMENTS[optimizer] * trainable


def measure_activations(model: nn.Module, forward: Forward, precision: str) -> Activations:
    """Saved-tensor bytes of `forward(model, b)` for b = 2 and 4 on fake tensors under
    `precision`'s autocast, with each top-level block's share (the elements of a
    `...blocks` ModuleList) for the checkpointed figure. Nothing is computed."""
    one, two = _saved(model, forward, 2, precision), _saved(model, forward, 4, precision)
    ckpt_one = one.total - sum(one.blocks) + one.inputs + max(one.blocks, default=0)
    ckpt_two = two.total - sum(two.blocks) + two.inputs + max(two.blocks, default=0)
    per_image = max(0, two.total - one.total) // 2
    per_ckpt = max(0, ckpt_two - ckpt_one) // 2
    return Activations(fixed=max(0, one.total - 2 * per_image), per_image=per_image,
                       fixed_ckpt=max(0, ckpt_one - 2 * per_ckpt), per_image_ckpt=per_ckpt)


@dataclass
class _Saved:
    total: int = 0
    blocks: tuple[int, ...] = ()  # bytes saved inside each block
    inputs: int = 0  # bytes of the blocks' inputs (what checkpointing keeps)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for name, child in model.named_modules()
            if isinstance(child, nn.ModuleList) and name.split(".")[-1].endswith("blocks")
            for block in child]


def _saved(model: nn.Module, forward: Forward, batch: int, precision: str) -> _Saved:
    seen: dict[int, int] = {}
    per_block: list[int] = []
    inputs = 0
    current: list[int] = []  # the index of the block running, if any

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl: views share it
        if key not in seen:
            seen[key] = storage.nbytes()
            if current:
                per_block[current[-1]] += storage.nbytes()
        return t

    def enter(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            nonlocal inputs
            current.append(i)
            if not torch.is_grad_enabled():  # a frozen block keeps nothing (probe)
                return
            inputs += sum(a.untyped_storage().nbytes() for a in args
                          if isinstance(a, torch.Tensor))
        return hook

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        current.pop()

    handles = []
    for i, block in enumerate(_blocks(model)):
        per_block.append(0)
        handles += [block.register_forward_pre_hook(enter(i)),
                    block.register_forward_hook(leave)]
    autocast = (torch.autocast("cpu", dtype=_DTYPES[precision]) if precision in _DTYPES
                else contextlib.nullcontext())
    checkpointing = [m for m in model.modules() if getattr(m, "grad_checkpointing", False)]
    for m in checkpointing:  # measured without: the checkpointed figure is derived
        m.grad_checkpointing = False  # type: ignore[assignment]
    try:
        with _fake_mode(model), saved_tensors_hooks(pack, lambda t: t), autocast:
            loss = forward(model, batch)
        del loss
    finally:
        for h in handles:
            h.remove()
        for m in checkpointing:
            m.grad_checkpointing = True  # type: ignore[assignment]
    return _Saved(sum(seen.values()), tuple(per_block), inputs)


def _fake_mode(model: nn.Module) -> FakeTensorMode:
    """The fake-tensor mode the pass runs in: shapes, dtypes and storages as torch would
    make them, no computation and no memory. A model built in one (`fake_model`) runs in
    its own; real weights are taken in as fakes."""
    first = next(model.parameters(), None)
    if isinstance(first, FakeTensor):
        return first.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with fake weights: in a moment and no memory, whatever the model's size."""
    with FakeTensorMode():
        return build()
