"""Training cratemae is training the authors' model: from the authors' weights (their key
layout, tests/data/official-crate-mae-tiny.safetensors), on the same batches and masks, in
float64, cratemae and the authors' computation written plainly (`reference_forward` with
the authors' own float32 position table, on its own copy of the parameters) take the same
AdamW steps with the groups each side's pre-training uses (MAE's `add_weight_decay`), and
agree to the last digits (4e-16 measured): losses and final weights to 1e-10, where a
float64 position table (1.5e-9), a float32 loss (1.9e-7) or the tokens left undecayed
(2.8e-7) make the losses differ by more."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import REPO
from torch import nn

from cratemae.model import CrateMAE, CrateMAEConfig, load_authors_state_dict
from cratemae.model.patches import masked_patch_loss
from cratemae.model.pos_embed import sincos_2d
from cratemae.model.reference import reference_forward
from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import MAETask

VECTORS = REPO / "tests" / "data" / "official-crate-mae-tiny.safetensors"
DEMO = REPO / "recipes" / "demo.toml"
STEPS, BATCH, LR, WEIGHT_DECAY, MASK_RATIO = 50, 4, 1e-3, 0.05, 0.75
TOL = 1e-10


# --- the authors' code, transcribed (Ma-Lab-Berkeley/CRATE model/crate_ae/pos_embed.py, and
# timm 0.3.2's optim_factory.add_weight_decay, which MAE's main_pretrain.py calls) -----------
def authors_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float32)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def authors_table(embed_dim: int, grid_size: int) -> torch.Tensor:
    """get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=True), as their model copies
    it into its parameter: `torch.from_numpy(pos_embed).float()`."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([authors_1d(embed_dim // 2, grid[0]),
                          authors_1d(embed_dim // 2, grid[1])], axis=1)
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return torch.from_numpy(emb).float()


def mae_add_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


# --- the two sides -------------------------------------------------------------------------
def _authors_weights() -> tuple[CrateMAEConfig, dict[str, torch.Tensor]]:
    meta = json.loads(safe_open(str(VECTORS), "pt").metadata()["config"])
    config = CrateMAEConfig.from_dict(
        {k: v for k, v in meta.items() if k not in ("mask_ratio", "seed")})
    tensors = load_file(str(VECTORS))
    return config, {k.removeprefix("model."): v for k, v in tensors.items()
                    if k.startswith("model.")}


def _model(config: CrateMAEConfig, state: dict[str, torch.Tensor]) -> CrateMAE:
    model = CrateMAE(config)
    load_authors_state_dict(model, state)
    return model.double()


def _adamw(groups: list[dict]) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), foreach=False, fused=False)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    assert loss.dtype == torch.float64
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _train(ours: CrateMAE, ref: CrateMAE) -> tuple[list[float], list[float]]:
    """STEPS AdamW steps of each side on the same batches and masks; their losses."""
    recipe = load_recipe(DEMO, [f"optim.weight_decay={WEIGHT_DECAY}"])
    opt_ours = _adamw(MAETask(recipe, ours).param_groups())
    opt_ref = _adamw(mae_add_weight_decay(ref, WEIGHT_DECAY))
    gen = torch.Generator().manual_seed(0)
    size, patches = ours.config.img_size, ours.config.num_patches
    loss_ours, loss_ref = [], []
    for _ in range(STEPS):
        imgs = torch.randn(BATCH, 3, size, size, generator=gen, dtype=torch.float64)
        noise = torch.rand(BATCH, patches, generator=gen)  # float32, as MAETask's
        loss_ours.append(_step(opt_ours, ours(imgs, MASK_RATIO, noise).loss))
        loss_ref.append(_step(opt_ref, reference_forward(ref, imgs, MASK_RATIO, noise).loss))
    return loss_ours, loss_ref


@pytest.fixture(scope="module")
def trained() -> tuple[CrateMAE, CrateMAE, CrateMAE, list[float], list[float]]:
    config, state = _authors_weights()
    start, ours, ref = (_model(config, state) for _ in range(3))
    # The reference adds the table the authors' code builds, not cratemae's.
    ref.encoder.pos_embed = authors_table(config.embed_dim, config.grid_size)[None].double()
    # One thread: ~10 ms a step; two threads on a shared, busy machine took 10x longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return start, ours, ref, *_train(ours, ref)
    finally:
        torch.set_num_threads(threads)


def test_training_matches_the_authors_computation(trained) -> None:
    start, ours, ref, loss_ours, loss_ref = trained
    diffs = [abs(a - b) for a, b in zip(loss_ours, loss_ref, strict=True)]
    assert max(diffs) <= TOL, f"losses differ by up to {max(diffs):.2e} (step {np.argmax(diffs)})"
    assert loss_ours[-1] < loss_ours[0]  # it trained
    theirs = dict(ref.named_parameters())
    worst = max(((n, (p - theirs[n]).abs().max().item()) for n, p in ours.named_parameters()),
                key=lambda item: item[1])
    assert worst[1] <= TOL, f"final weights differ by up to {worst[1]:.2e} in {worst[0]}"
    # every tensor moved far beyond the tolerance: the comparison is not vacuous
    first = dict(start.named_parameters())
    moved = min((p - first[n]).abs().max().item() for n, p in ours.named_parameters())
    assert moved > 1e-4


@pytest.mark.parametrize("dim, grid", [(64, 8), (96, 8), (384, 14), (768, 14), (1024, 16)])
def test_position_table_is_the_authors_float32_table(dim: int, grid: int) -> None:
    """Bit for bit on this machine (both are numpy's float32 arithmetic)."""
    assert torch.equal(sincos_2d(dim, grid, grid), authors_table(dim, grid))


def test_position_table_is_the_same_under_torch_compile() -> None:
    """Compiled, the numpy calls would be traced into torch ops, whose float32 sin and cos
    round differently: a compiled model at another grid size must see the same table."""
    compiled = torch.compile(lambda x: x + sincos_2d(64, 5, 7), backend="eager")
    x = torch.zeros(1 + 5 * 7, 64)
    assert torch.equal(compiled(x), sincos_2d(64, 5, 7))


@pytest.mark.parametrize("pred, imgs, expected", [
    (torch.float64, torch.float64, torch.float64),  # a float64 model: as the authors compute
    (torch.float64, torch.float32, torch.float64),
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32),  # bf16 autocast: as before
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float16, torch.float16, torch.float32),
])
def test_loss_keeps_the_models_precision(pred, imgs, expected) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    p = torch.rand(2, 4, 48, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1]])
    loss = masked_patch_loss(x.to(imgs), p.to(pred), mask, 4)
    assert loss.dtype == expected
    exact = masked_patch_loss(x.to(imgs).double(), p.to(pred).double(), mask, 4)
    torch.testing.assert_close(loss, exact.to(expected))
