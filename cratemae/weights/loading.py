"""Load a model from anything a user may call a checkpoint, ready for inference.

A checkpoint directory, a run directory (its latest checkpoint), or a weights file written
by `write_model_weights`, `cratemae export` or `cratemae import-authors` (the file, or the
directory holding it). The weights must fit the configuration stored with them exactly:
a mismatch is a `BadInputError` naming the file, never a half-loaded model.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cratemae.checkpoints import (
    check_state_dict_matches,
    read_model_weights,
)
from cratemae.checkpoints.layout import CKPT_SUBDIR, EMA_PREFIX, META, MODEL_FILE
from cratemae.checkpoints.resolve import complete_checkpoints, resolve_checkpoint
from cratemae.errors import BadInputError
from cratemae.model import CrateEncoder, CrateMAE, CrateMAEConfig
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CONFIG_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "load_model",
    "newest_run_checkpoint",
]

CONFIG_FILE = "config.json"  # written next to exported weights


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with the facts needed to feed it images."""

    model: CrateMAE | CrateEncoder  # CrateEncoder when the file holds no decoder
    weights_file: Path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocessing_known: bool  # False: mean/std are ImageNet's, assumed

    @property
    def config(self) -> CrateMAEConfig:
        return self.model.config

    @property
    def encoder(self) -> CrateEncoder:
        return self.model if isinstance(self.model, CrateEncoder) else self.model.encoder


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read, check and load the weights at `path` (see the module docstring)."""
    target = resolve_checkpoint(path)
    file = target if target.is_file() else target / MODEL_FILE
    state, raw_config = read_model_weights(target)  # keys without wrapper prefixes
    try:
        config = CrateMAEConfig.from_dict(raw_config)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"{file}: bad model configuration ({err})") from None
    encoder_only = not any(k.startswith("decoder_") or k == "mask_token" for k in state)
    model: CrateMAE | CrateEncoder
    if encoder_only:  # an encoder-only export, or a fine-tuned classifier
        # A fine-tune's EMA copy is left out: the weights it trained are the ones loaded.
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if not k.startswith(EMA_PREFIX)}
        head = state.get("head.weight")
        model = CrateEncoder(config, num_classes=0 if head is None else head.shape[0])
    else:
        model = CrateMAE(config)
    state = check_state_dict_matches(model, state, str(file))
    model.load_state_dict(state, strict=True)
    model.eval()
    mean_std = _preprocessing(file)
    mean, std = mean_std or (IMAGENET_MEAN, IMAGENET_STD)
    return LoadedModel(model=model, weights_file=file, mean=mean, std=std,
                       preprocessing_known=mean_std is not None)


def _triple(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def _preprocessing(file: Path) -> tuple[tuple, tuple] | None:
    """(mean, std) the weights were trained with: from the training recipe that a checkpoint
    directory records, or from the config.json written next to exported weights."""
    where = file.parent
    try:
        if (where / META).is_file():
            meta = json.loads((where / META).read_text(encoding="utf-8"))
            found = tomllib.loads(meta.get("recipe_toml", "")).get("data", {})
            # A recipe that does not set them used the schema's default, ImageNet's.
            found = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **found}
        elif (where / CONFIG_FILE).is_file():
            found = json.loads((where / CONFIG_FILE).read_text(encoding="utf-8"))
        else:
            return None
        mean, std = _triple(found.get("mean")), _triple(found.get("std"))
    except (OSError, ValueError, AttributeError):  # unreadable: fall back to the default
        return None
    return (mean, std) if mean and std else None


def newest_run_checkpoint(runs_dir: Path) -> Path | None:
    """The most recently saved complete checkpoint of any run under `runs_dir` (searched
    three levels deep: runs/NAME, runs/GROUP/NAME, ...), or None."""
    best: tuple[float, Path] | None = None
    for depth in ("*", "*/*", "*/*/*"):
        for ckpt_dir in runs_dir.glob(f"{depth}/{CKPT_SUBDIR}"):
            found = complete_checkpoints(ckpt_dir)
            if found:
                path, meta = found[-1]
                key = (float(meta.get("wall_time", 0.0)), path)
                best = key if best is None or key[0] > best[0] else best
    return best[1] if best else None
