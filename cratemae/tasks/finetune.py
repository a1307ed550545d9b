"""Full fine-tuning: the pre-trained encoder plus a new linear head, all trained.

The recipe follows MAE's `main_finetune.py`: AdamW with layer-wise lr decay (timm's
`param_groups_layer_decay` over the encoder's `group_matcher`), warm-up + cosine, label
smoothing, mixup/cutmix, RandAugment and random erasing (the loader's fine-tuning
transform), optionally an EMA of the weights; data.val is evaluated every epoch and the
best weights kept. It runs in the one training loop (`Trainer`), so launch, precision,
checkpoints, resume and preemption are those of `pretrain`.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cratemae.checkpoints import Resume
from cratemae.data import build_data
from cratemae.distributed import dist
from cratemae.distributed.precision import resolve_precision
from cratemae.errors import BadInputError
from cratemae.eval.classify import classify
from cratemae.eval.labels import check_labels, class_names, resolve_num_classes
from cratemae.fs import atomic_write_json
from cratemae.model import CrateEncoder
from cratemae.recipe import Recipe, dump_recipe
from cratemae.rundir import RunFiles
from cratemae.tasks.follow import follow_checkpoint
from cratemae.train.plan import (
    Plan,
    estimate_memory,
    plan_data,
    plan_memory,
    plan_model,
    plan_run_dir,
    plan_schedule,
    plan_steps,
    unbuilt_demo_classes,
)
from cratemae.train.plan_time import Rates, plan_time
from cratemae.train.setup import RunSetup, Source, run_dir_for
from cratemae.train.task import Task
from cratemae.train.trainer import RunResult, Trainer
from cratemae.weights.load import checkpoint_digest, load_encoder

__all__ = ["FinetuneTask", "finetune", "plan_finetune"]

log = logging.getLogger("cratemae")


class FinetuneTask(Task):
    """Cross-entropy (soft targets under mixup/cutmix) of the encoder's head."""

    def __init__(self, recipe: Recipe, encoder: CrateEncoder, config: dict[str, Any],
                 num_classes: int) -> None:
        ft = recipe.finetune
        self.recipe, self.model, self.config = recipe, encoder, config
        _with_head(recipe, encoder, num_classes)
        self.num_classes = num_classes
        self.info = dist.get_dist_info()
        self.ema_decay = ft.ema_decay if ft.ema else None
        self.eval_every = ft.eval_every_epochs
        self.precision = resolve_precision(recipe.run.precision, self.info.device)
        self.mixup = _make_mixup(recipe, num_classes)
        self.data = build_data(recipe.data, **_train_data(recipe),
                               img_size=encoder.config.img_size, seed=recipe.run.seed,
                               rank=self.info.rank, world_size=self.info.world_size,
                               decode_device=self.info.device)

    def param_groups(self) -> list[dict[str, Any]]:
        from timm.optim import param_groups_layer_decay

        return param_groups_layer_decay(
            self.model, weight_decay=self.recipe.optim.weight_decay,
            no_weight_decay_list=self.model.no_weight_decay(),
            layer_decay=self.recipe.finetune.layer_decay)

    def loss(self, model: nn.Module, batch: Any, micro: int) -> torch.Tensor:
        check_labels(batch.labels, self.num_classes, "finetune.num_classes")
        imgs = batch.model_input(self.info.device)
        labels = batch.labels.to(self.info.device, non_blocking=True)
        smoothing = self.recipe.finetune.label_smoothing
        if self.mixup is None:
            return F.cross_entropy(model(imgs), labels, label_smoothing=smoothing)
        imgs, targets = _seeded(self.mixup, imgs, labels,
                                f"{self.recipe.run.seed}/{micro}/{self.info.rank}")
        return torch.sum(-targets * F.log_softmax(model(imgs), dim=-1), dim=-1).mean()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return classify(model, self.recipe.data, self.model.config.img_size, self.precision)


def _with_head(recipe: Recipe, encoder: CrateEncoder, num_classes: int) -> CrateEncoder:
    """The encoder as fine-tuning trains it: a new head, drop path, checkpointing."""
    ft = recipe.finetune
    encoder.set_grad_checkpointing(recipe.run.grad_checkpointing)
    encoder.reset_classifier(num_classes, ft.pool)
    encoder.set_drop_path_rate(ft.drop_path_rate)
    return encoder


def _train_data(recipe: Recipe) -> dict[str, Any]:
    """How fine-tuning reads data.train (the run and its plan): labelled, augmented."""
    return {"split": "train", "augment": "randaugment" if recipe.finetune.randaugment
            else "crop", "labels": True}


def _make_mixup(recipe: Recipe, num_classes: int) -> Any:
    ft = recipe.finetune
    if ft.mixup <= 0 and ft.cutmix <= 0:
        return None
    if recipe.data.batch_size % 2:
        raise BadInputError(f"data.batch_size = {recipe.data.batch_size}: mixup/cutmix pair "
                            f"each image with another, so it must be even")
    from timm.data import Mixup

    return Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, prob=ft.mixup_prob,
                 switch_prob=ft.mixup_switch_prob, label_smoothing=ft.label_smoothing,
                 num_classes=num_classes)


def _seeded(mixup: Any, imgs: torch.Tensor, labels: torch.Tensor,
            key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup draws from numpy's and python's global generators: seed them by
    (seed, micro-batch, rank) for the call, so a resumed run mixes exactly as before."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        np.random.seed(zlib.crc32(key.encode()))
        random.seed(key)
        return mixup(imgs, labels)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def finetune(recipe: Recipe, checkpoint: str | Path, *, run_dir: Path | None = None,
             resume: Resume = Resume.AUTO, overwrite: bool = False,
             recipe_name: str | None = None,
             on_log: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Fine-tune the encoder of `checkpoint` into `run_dir` and write `finetune.json` there
    (final and best top-1/top-5, and the checkpoint: its path and SHA-256).

    `run_dir` defaults to the recipe's run.out_dir when it sets one, else to a directory
    named after the checkpoint's run (`train.setup.default_run_dir`; `recipe_name` joins
    it). A directory that holds the fine-tune of other weights is refused, or with
    `overwrite` replaced. The image size, mean and std are the checkpoint's unless the
    recipe sets them (`tasks.follow.follow_checkpoint`)."""
    source = Source(str(checkpoint), checkpoint_digest(checkpoint))
    loaded = load_encoder(checkpoint, recipe.model)
    recipe, notes = follow_checkpoint(recipe, loaded)
    where = run_dir_for(recipe, checkpoint, "finetune", out=run_dir, recipe_name=recipe_name)
    recipe = recipe.model_copy(update={"run": recipe.run.model_copy(
        update={"out_dir": str(where)})})  # recipe.toml says where the run went
    with RunSetup(recipe, where, resume=resume, source=source,
                  result=RunFiles(where).finetune, overwrite=overwrite) as run:
        encoder, config = loaded  # the same new head on every rank: seeded by RunSetup
        num_classes = resolve_num_classes(recipe, recipe.finetune.num_classes,
                                          "finetune.num_classes")
        task = FinetuneTask(recipe, encoder, config, num_classes)
        with run.open_run_dir() as run_dir:
            for note in notes:
                log.info(note)
            log.info("fine-tuning %s (%d classes, %d px) in %s, %d process(es) on %s",
                     checkpoint, num_classes, encoder.config.img_size, run_dir,
                     run.info.world_size, run.info.device)
            result = Trainer(run, task, on_log=on_log).fit()
            if dist.is_main_process():
                summary = {"final": result.evals[-1] if result.evals else None,
                           "best": result.best, **source.fields(),
                           "last_checkpoint": str(result.last_checkpoint),
                           "recipe": dump_recipe(recipe), "num_classes": num_classes,
                           "steps": result.state.step,
                           "class_names": list(class_names(recipe) or []) or None}
                atomic_write_json(run.files.finetune, summary)
        return result


def plan_finetune(recipe: Recipe, checkpoint: str | Path, *, run_dir: Path | None = None,
                  resume: Resume = Resume.AUTO, overwrite: bool = False,
                  recipe_name: str | None = None, world: int = 1, rank: int = 0,
                  gpu_memory: float | None = None,
                  images_per_second: float | None = None,
                  rates: Rates | None = None) -> Plan:
    """What `finetune` would do, need and cost, without an accelerator or a write
    (`cratemae finetune --dry-run`): each step of its start-up, every failure a reason."""
    plan = Plan("finetune", world=world, rank=rank)
    source = loaded = None
    with plan.check():
        source = Source(str(checkpoint), checkpoint_digest(checkpoint))
        loaded = load_encoder(checkpoint, recipe.model)
        recipe, notes = follow_checkpoint(recipe, loaded)
        plan.add("Model", "checkpoint", str(checkpoint),
                 "; ".join([source.describe(), *notes]))
    with plan.check():
        where = run_dir_for(recipe, checkpoint, "finetune", out=run_dir,
                            recipe_name=recipe_name)
        recipe = recipe.model_copy(update={"run": recipe.run.model_copy(
            update={"out_dir": str(where)})})
        plan_run_dir(plan, RunSetup(recipe, where, resume=resume, source=source,
                                    result=RunFiles(where).finetune, overwrite=overwrite))
    num_classes = None
    with plan.check():
        wanted = recipe.finetune.num_classes
        num_classes = (wanted or unbuilt_demo_classes(recipe.data)
                       or resolve_num_classes(recipe, wanted, "finetune.num_classes"))
        _make_mixup(recipe, num_classes)
    img_size = loaded.model.config.img_size if loaded is not None else (
        recipe.model.img_size or 224)
    data = plan_data(plan, recipe.data, **_train_data(recipe), img_size=img_size,
                     seed=recipe.run.seed)
    plan_data(plan, recipe.data, split="val", augment="none", labels=True, img_size=img_size,
              seed=0)
    if loaded is not None and num_classes is not None:
        encoder = _with_head(recipe, loaded.model, num_classes)  # type: ignore[arg-type]
        c = encoder.config
        plan_model(plan, encoder, f"{c.family} encoder, width {c.embed_dim}, depth {c.depth}, "
                   f"{c.img_size} px, {num_classes} classes", encoder_only=True)
        estimate = estimate_memory(encoder, _classifier_loss(num_classes), recipe,
                                   average=recipe.finetune.ema)
        plan.checkpoint_bytes = estimate.weights + estimate.average + estimate.optimizer
        plan_memory(plan, estimate, recipe.run.grad_checkpointing, gpu_memory)
    if data is not None:
        with plan.check():
            plan_schedule(plan, recipe, plan_steps(recipe, data.batches_per_epoch, world))
    plan_time(plan, images_per_second, rates=rates, model=recipe.model.name, img_size=img_size,
              data=recipe.data, task="finetune")
    return plan


def _classifier_loss(num_classes: int) -> Callable[[nn.Module, int], torch.Tensor]:
    def forward(model: nn.Module, batch: int) -> torch.Tensor:  # as FinetuneTask.loss
        size = model.config.img_size  # type: ignore[union-attr]
        logits = model(torch.randn(batch, 3, size, size))
        return F.cross_entropy(logits, torch.randint(num_classes, (batch,)))
    return forward
