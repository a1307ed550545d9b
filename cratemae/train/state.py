"""What a run must remember to resume exactly, and moving it to and from checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratemae.checkpoints import (
    check_state_dict_matches,
    collect_rng_state,
    load_checkpoint,
    pack_rng_state,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    unpack_rng_state,
)
from cratemae.checkpoints.state_dict import check_finite
from cratemae.distributed import dist
from cratemae.errors import BadInputError
from cratemae.recipe import Recipe, diff_recipes, dump_recipe, recipe_hash, unsafe_changes
from cratemae.recipe.load import parse_recipe

__all__ = ["TrainState", "restore_run", "save_run"]

log = logging.getLogger("cratemae")


@dataclass
class TrainState:
    """Counters that make a run resumable; a checkpoint's meta.json holds them."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # micro-batches consumed in the current epoch (the data position)
    samples_seen: int = 0  # over all ranks
    bad_samples: int = 0  # over all ranks
    nonfinite_skipped: int = 0
    # What recoveries from non-finite losses changed (`cratemae.train.recovery`), kept for
    # the rest of the run and across resume: how many there were, the factor on the
    # scheduled learning rate, and whether the step was switched to float32.
    recoveries: int = 0
    lr_factor: float = 1.0
    fp32: bool = False

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace_with(self, other: TrainState) -> None:
        """Take every counter of `other` in place (the loop holds this object)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(other, f.name))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        # meta["epoch"] is the epoch the checkpoint belongs to (the one it completes when
        # end_of_epoch); where to continue is the data position.
        fields = {f.name for f in dataclasses.fields(cls)} - {"epoch", "batch"}
        state = cls(**{k: v for k, v in meta.items() if k in fields})
        position = meta["data_position"]  # checked by the store: numbers where present
        missing = [k for k in ("epoch", "batch") if k not in position]
        if missing:
            raise BadInputError(f"meta.json field 'data_position' lacks {', '.join(missing)}")
        state.epoch, state.batch = position["epoch"], position["batch"]
        return state


def save_run(run_dir: Path, *, model: nn.Module, config: dict, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, state: TrainState, recipe: Recipe,
             end_of_epoch: bool) -> Path | None:
    """Save a checkpoint from rank 0 (every rank must call: RNG states are gathered)."""
    packed = pack_rng_state(collect_rng_state())
    rng_states = [unpack_rng_state(t) for t in dist.all_gather_tensors(packed)]
    if not dist.is_main_process():
        return None
    meta = {
        **state.to_meta(),
        # The trainer has already moved on to the next epoch when one ends.
        "epoch": state.epoch - 1 if end_of_epoch else state.epoch,
        "data_position": {"epoch": state.epoch, "batch": state.batch},
        "recipe_hash": recipe_hash(recipe),
        "recipe_toml": dump_recipe(recipe),
        "end_of_epoch": end_of_epoch,
    }
    path = save_checkpoint(
        run_dir, step=state.step, model_state={k: v.detach().cpu() for k, v in
                                               model.state_dict().items()},
        model_config=config, optimizer_state=optimizer.state_dict(),
        scaler_state=scaler.state_dict(), rng_states=rng_states, meta=meta,
    )
    run = recipe.run
    prune_checkpoints(run_dir, run.keep_last, run.keep_every_epochs)
    log.info("saved checkpoint %s", path)
    return path


def restore_run(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, recipe: Recipe,
                verb: str = "resumed from") -> TrainState:
    """Load everything from checkpoint `path` into the run, all or nothing (`verb` names
    why in the log line: a resume, or a rollback after non-finite losses)."""
    ckpt = load_checkpoint(path)
    if ckpt.weights_only:
        raise BadInputError(f"{ckpt.path}: a weights file cannot be resumed from")
    _check_recipe(ckpt.meta.get("recipe_toml", ""), recipe, ckpt.path)
    weights = check_state_dict_matches(model, ckpt.model_state, str(ckpt.path))
    # Weights, their average and the optimizer's moments: a NaN in any of them would make
    # every step after it NaN.
    check_finite(ckpt.model_state, str(ckpt.path))
    check_finite(ckpt.optimizer_state or {}, str(ckpt.path), what="optimizer state")
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (ValueError, KeyError) as err:
        raise BadInputError(
            f"{ckpt.path}: optimizer state does not fit the model ({err}); pre-training "
            f"checkpoints saved before the CLS and mask tokens were decayed (CHANGELOG, 0.1.0) "
            f"hold other weight-decay groups: finish such a run with the version that started "
            f"it, or start a new run with a new --out") from None
    model.load_state_dict(weights)
    if ckpt.scaler_state:
        scaler.load_state_dict(ckpt.scaler_state)
    rank, world = dist.get_dist_info().rank, dist.get_dist_info().world_size
    if ckpt.rng_states and len(ckpt.rng_states) == world:
        restore_rng_state(ckpt.rng_states[rank])
    else:
        log.warning("checkpoint was saved by %d ranks, this run has %d: RNG states not "
                    "restored (the data order and masks stay seeded)",
                    len(ckpt.rng_states or []), world)
    try:
        state = TrainState.from_meta(ckpt.meta)
    except BadInputError as err:
        raise BadInputError(f"{ckpt.path}: {err}") from None
    log.info("%s %s (step %d, epoch %d, batch %d)", verb, ckpt.path, state.step,
             state.epoch, state.batch)
    return state


def _check_recipe(saved_toml: str, recipe: Recipe, source: Path) -> None:
    """Refuse to resume with a changed recipe unless every change is marked safe."""
    try:
        saved = parse_recipe(tomllib.loads(saved_toml), source=f"{source} (saved recipe)")
    except tomllib.TOMLDecodeError:
        raise BadInputError(f"{source}: meta.json holds no readable recipe") from None
    unsafe = unsafe_changes(saved, recipe)
    if unsafe:
        raise BadInputError(
            f"{source}: the recipe changed since this checkpoint in keys that cannot change on "
            f"resume: {', '.join(unsafe)} (start a new run with a new --out)")
    for key, (old, new) in diff_recipes(saved, recipe).items():
        log.info("recipe change on resume: %s %r -> %r", key, old, new)
