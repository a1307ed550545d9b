"""`cratemae finetune`: fine-tune with a new classification head (stub until it lands)."""

from __future__ import annotations

from cratemae.commands.options import (
    CheckpointOpt,
    JsonOpt,
    OutOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    parse_resume,
    require_file,
)
from cratemae.errors import NotBuiltError
from cratemae.recipe import load_recipe

__all__ = ["finetune"]


def finetune(
    recipe: RecipeArg,
    checkpoint: CheckpointOpt,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Fine-tune a pre-trained encoder with a new classification head.

    Examples:
      $ cratemae finetune recipes/finetune_in1k.toml --checkpoint runs/base/last.pt
      $ cratemae finetune recipes/finetune_in1k.toml --checkpoint runs/base/last.pt --out runs/ft
      $ cratemae finetune recipes/finetune_in1k.toml --checkpoint runs/base/last.pt --resume never
    """
    load_recipe(recipe, set_ or [])
    require_file(checkpoint, "checkpoint")
    parse_resume(resume)
    raise NotBuiltError("cratemae finetune is not built yet")
