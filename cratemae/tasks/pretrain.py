"""Masked-autoencoder pre-training: the task, and `pretrain()`, which runs it."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratemae.checkpoints import Resume
from cratemae.data import build_data
from cratemae.distributed import dist
from cratemae.errors import BadInputError
from cratemae.model import CrateMAE, MAEViT, create_model
from cratemae.recipe import Recipe
from cratemae.tasks.monitor import PretrainMonitor
from cratemae.train.memory import fake_model
from cratemae.train.optim import param_groups
from cratemae.train.plan import (
    Plan,
    estimate_memory,
    plan_data,
    plan_memory,
    plan_model,
    plan_run_dir,
    plan_schedule,
    plan_steps,
)
from cratemae.train.plan_time import Rates, plan_time
from cratemae.train.setup import RunSetup
from cratemae.train.task import Task
from cratemae.train.trainer import RunResult, Trainer

__all__ = ["MAETask", "build_mae", "plan_pretrain", "pretrain"]

log = logging.getLogger("cratemae")
# How pre-training reads data.train (the run and its plan): cropped, unlabelled.
TRAIN_DATA: dict[str, Any] = {"split": "train", "augment": "crop", "labels": False}


def build_mae(recipe: Recipe) -> CrateMAE | MAEViT:
    """The model the recipe names (CRATE-MAE, or MAE's ViT for `mae_vit_*` / family "vit"),
    with its overrides; a bad combination is bad input."""
    try:
        model = create_model(recipe.model.name, **recipe.model.config_overrides())
    except ValueError as err:
        raise BadInputError(f"model: {err}") from None
    patches = model.config.num_patches
    if int(patches * (1 - recipe.model.mask_ratio)) < 1:
        raise BadInputError(f"model.mask_ratio = {recipe.model.mask_ratio} leaves no visible "
                            f"patch of the {patches}: the encoder would see only mask tokens")
    return model


class MAETask(Task):
    """Reconstruct masked patches. Masks are drawn from a generator seeded by (seed,
    micro-batch, rank), so a resumed run masks exactly as an uninterrupted one would.
    With `run.eval_every_steps` and data.val, validated by `PretrainMonitor` (`monitor`)."""

    def __init__(self, recipe: Recipe, model: CrateMAE | MAEViT) -> None:
        self.recipe, self.model = recipe, model
        model.set_grad_checkpointing(recipe.run.grad_checkpointing)
        self.config = model.config.to_dict()
        self.info = dist.get_dist_info()
        self._gen: torch.Generator | None = None
        self._monitor: PretrainMonitor | None = None
        every = recipe.run.eval_every_steps
        if every is not None and recipe.data.val is None:
            if dist.is_main_process():
                log.info("data.val is not set: no validation during pre-training "
                         "(run.eval_every_steps = %d)", every)
        elif every is not None:
            self.monitor_every = every
            self._monitor = PretrainMonitor(recipe, self.info.device, model.config.img_size)
        if recipe.data.train is None:
            raise BadInputError("data.train: no training data given in the recipe")
        self.data = build_data(recipe.data, **TRAIN_DATA, img_size=model.config.img_size,
                               seed=recipe.run.seed, rank=self.info.rank,
                               world_size=self.info.world_size, decode_device=self.info.device)

    def param_groups(self) -> list[dict[str, Any]]:
        """MAE's pre-training groups, what the authors trained with: every weight matrix and
        the CLS and mask tokens decay, biases and norms do not (the model's
        `no_weight_decay()` is the fine-tuning convention and is not used here)."""
        return param_groups(self.model, self.recipe.optim.weight_decay)

    def loss(self, model: nn.Module, batch: Any, micro: int) -> torch.Tensor:
        imgs = batch.model_input(self.info.device)
        noise = self._noise(imgs.shape[0], micro)
        return model(imgs, mask_ratio=self.recipe.model.mask_ratio, noise=noise).loss

    def monitor(self, model: nn.Module, step: int, run_dir: Path) -> dict[str, Any] | None:
        if self._monitor is None:
            return None
        return self._monitor(model, step, run_dir)  # type: ignore[arg-type]

    def _noise(self, batch_size: int, micro: int) -> torch.Tensor:
        device = self.info.device
        if self._gen is None:
            self._gen = torch.Generator(device=device)
        key = f"{self.recipe.run.seed}/{micro}/{self.info.rank}".encode()
        self._gen.manual_seed(zlib.crc32(key))
        L = self.model.config.num_patches
        return torch.rand(batch_size, L, generator=self._gen, device=device)


def pretrain(recipe: Recipe, *, run_dir: Path | None = None, resume: Resume = Resume.AUTO,
             on_log: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Pre-train from `recipe` into `run_dir` (default `run.out_dir`), resuming per `resume`
    (`Resume.parse("auto" | "never" | path)`). Works alone, under torchrun and under srun."""
    with RunSetup(recipe, run_dir, resume=resume, seed_per_rank=True) as run:
        task = MAETask(recipe, build_mae(recipe))  # bad data stops here, before any writing
        with run.open_run_dir():
            log.info("run directory %s, %d process(es) on %s", run.run_dir,
                     run.info.world_size, run.info.device)
            return Trainer(run, task, on_log=on_log).fit()


def plan_pretrain(recipe: Recipe, *, run_dir: Path | None = None,
                  resume: Resume = Resume.AUTO, world: int = 1, rank: int = 0,
                  gpu_memory: float | None = None,
                  images_per_second: float | None = None,
                  rates: Rates | None = None) -> Plan:
    """What `pretrain` would do, need and cost, without an accelerator or a write
    (`cratemae pretrain --dry-run`): each step of its start-up, every failure a reason."""
    plan = Plan("pretrain", world=world, rank=rank)
    setup = RunSetup(recipe, run_dir, resume=resume, seed_per_rank=True)
    plan_run_dir(plan, setup)
    model = None
    with plan.check(), torch.device("meta"):
        model = build_mae(recipe)
    img_size = model.config.img_size if model is not None else recipe.model.img_size or 224
    data = None
    if recipe.data.train is None:
        plan.reasons.append("data.train: no training data given in the recipe")
    else:
        data = plan_data(plan, recipe.data, **TRAIN_DATA, img_size=img_size,
                         seed=recipe.run.seed)
    if recipe.run.eval_every_steps is not None and recipe.data.val is not None:
        plan_data(plan, recipe.data, split="val", augment="none", labels=False,
                  img_size=img_size, seed=recipe.run.seed)
    if model is not None:
        plan_model(plan, model, recipe.model.name, mask_ratio=recipe.model.mask_ratio)
        fake = fake_model(lambda: build_mae(recipe))  # shapes only, as the meta one
        estimate = estimate_memory(fake, _mae_loss(recipe), recipe)
        plan.checkpoint_bytes = estimate.weights + estimate.optimizer
        plan_memory(plan, estimate, recipe.run.grad_checkpointing, gpu_memory)
    if data is not None:
        with plan.check():
            plan_schedule(plan, recipe, plan_steps(recipe, data.batches_per_epoch, world))
    plan_time(plan, images_per_second, rates=rates, model=recipe.model.name, img_size=img_size,
              data=recipe.data, task="pretrain")
    return plan


def _mae_loss(recipe: Recipe) -> Callable[[nn.Module, int], torch.Tensor]:
    def forward(m: nn.Module, batch: int) -> torch.Tensor:  # as MAETask.loss
        c = m.config  # type: ignore[union-attr]
        imgs = torch.randn(batch, c.in_chans, c.img_size, c.img_size)
        noise = torch.rand(batch, c.num_patches)
        return m(imgs, mask_ratio=recipe.model.mask_ratio, noise=noise).loss
    return forward
