"""Evaluation follows the checkpoint: the preprocessing a probe or fine-tune of a loaded
encoder uses, from the checkpoint unless the recipe sets it (in its file or by --set)."""

from __future__ import annotations

import json
from pathlib import Path

from cratemae.recipe import Recipe
from cratemae.weights.load import LoadedModel

__all__ = ["follow_checkpoint"]


def follow_checkpoint(recipe: Recipe, loaded: LoadedModel) -> tuple[Recipe, list[str]]:
    """The recipe with the data.mean and data.std that `loaded` was trained with, except
    those the recipe sets itself (in its file or by --set): an encoder is evaluated and
    tuned on pixels normalised as it learned them. Also the lines to log: the recipe's
    values where they differ from the checkpoint's, and an assumption where the checkpoint
    records none."""
    data, notes = recipe.data, []
    mine = [k for k in ("mean", "std") if k in data.model_fields_set]
    theirs = {"mean": tuple(loaded.mean), "std": tuple(loaded.std)}
    differ = [k for k in mine if tuple(getattr(data, k)) != theirs[k]]
    if differ:
        said = ", ".join(f"{k} {list(getattr(data, k))} (checkpoint: {list(theirs[k])})"
                         for k in differ)
        notes.append(f"normalising with the recipe's {'/'.join(differ)}, not the "
                     f"checkpoint's: {said}")
    elif len(mine) < 2 and not loaded.preprocessing_known:
        notes.append(f"{loaded.path}: no record of the mean/std it was trained with; "
                     f"assuming ImageNet's (set data.mean and data.std if they differ)")
    stored = _stored_img_size(loaded.weights_file)
    if recipe.model.img_size is not None and stored not in (None, recipe.model.img_size):
        notes.append(f"images of {recipe.model.img_size} px (the recipe's model.img_size), "
                     f"not the checkpoint's {stored} px: its position table is recomputed")
    update = {k: v for k, v in theirs.items() if k not in mine}
    if update:
        recipe = recipe.model_copy(update={"data": data.model_copy(update=update)})
    return recipe, notes


def _stored_img_size(file: Path) -> int | None:
    """The image size in a weights file's stored configuration (its header alone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return int(json.loads((f.metadata() or {})["config"])["img_size"])
    except Exception:  # unreadable: the loader has read it already, so this is only a note
        return None
