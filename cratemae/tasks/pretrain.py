"""Masked-autoencoder pre-training: the task, and `pretrain()`, which runs it."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratemae.checkpoints import find_resume
from cratemae.checkpoints.files import atomic_write_text
from cratemae.data import build_loader
from cratemae.distributed import dist
from cratemae.errors import BadInputError
from cratemae.model import CrateMAE, create_model
from cratemae.recipe import Recipe, dump_recipe
from cratemae.train.run_dir import log_file
from cratemae.train.trainer import RunResult, Trainer

__all__ = ["MAETask", "build_mae", "pretrain"]

log = logging.getLogger("cratemae")


def build_mae(recipe: Recipe) -> CrateMAE:
    """The model the recipe names, with its overrides; a bad combination is bad input."""
    try:
        return create_model(recipe.model.name, **recipe.model.config_overrides())
    except ValueError as err:
        raise BadInputError(f"model: {err}") from None


class MAETask:
    """Reconstruct masked patches. Masks are drawn from a generator seeded by (seed,
    micro-batch, rank), so a resumed run masks exactly as an uninterrupted one would."""

    def __init__(self, recipe: Recipe, model: CrateMAE) -> None:
        self.recipe, self.model = recipe, model
        self.config = model.config.to_dict()
        self.info = dist.get_dist_info()
        self._gen: torch.Generator | None = None

    def loader(self, epoch: int, start_batch: int) -> Any:
        r = self.recipe
        if r.data.train is None:
            raise BadInputError("data.train: no training data given in the recipe")
        return build_loader(r.data, split="train", task="pretrain",
                            img_size=self.model.config.img_size, seed=r.run.seed, epoch=epoch,
                            rank=self.info.rank, world_size=self.info.world_size,
                            start_batch=start_batch, decode_device=self.info.device)

    def loss(self, model: nn.Module, batch: Any, micro: int) -> torch.Tensor:
        imgs = batch.images.to(self.info.device, non_blocking=True)
        noise = self._noise(imgs.shape[0], micro)
        return model(imgs, mask_ratio=self.recipe.model.mask_ratio, noise=noise).loss

    def _noise(self, batch_size: int, micro: int) -> torch.Tensor:
        device = self.info.device
        if self._gen is None:
            self._gen = torch.Generator(device=device)
        key = f"{self.recipe.run.seed}/{micro}/{self.info.rank}".encode()
        self._gen.manual_seed(zlib.crc32(key))
        L = self.model.config.num_patches
        return torch.rand(batch_size, L, generator=self._gen, device=device)


def pretrain(recipe: Recipe, *, out_dir: Path | None = None, resume: str = "auto",
             on_log: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Pre-train from `recipe` into `out_dir` (default `run.out_dir`), resuming per `resume`
    ("auto", "never" or a checkpoint path). Works alone, under torchrun and under srun."""
    run_dir = Path(out_dir or recipe.run.out_dir)
    info = dist.init_distributed(recipe.run.master_addr, recipe.run.master_port)
    try:
        torch.manual_seed(recipe.run.seed + info.rank)
        resume_from = find_resume(run_dir, resume)
        if resume == "never" and find_resume(run_dir, "auto") is not None:
            raise BadInputError(
                f"{run_dir} already holds checkpoints and --resume never would mix a new run "
                f"into them: give a new --out, or remove the directory first")
        task = MAETask(recipe, build_mae(recipe))
        task.loader(epoch=0, start_batch=0)  # bad data stops the run before it writes anything
        if info.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "recipe.toml", dump_recipe(recipe))
        with log_file(run_dir / "log.txt" if info.rank == 0 else None):
            log.info("run directory %s, %d process(es) on %s", run_dir, info.world_size,
                     info.device)
            trainer = Trainer(recipe, task, run_dir, resume_from, on_log=on_log)
            return trainer.fit()
    finally:
        dist.destroy_distributed()
