"""`cratemae pretrain`: pre-train CRATE-MAE from a recipe (stub until the trainer lands)."""

from __future__ import annotations

from cratemae.commands.options import JsonOpt, OutOpt, RecipeArg, ResumeOpt, SetOpt, parse_resume
from cratemae.errors import NotBuiltError
from cratemae.recipe import load_recipe

__all__ = ["pretrain"]


def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Pre-train CRATE-MAE from a recipe.

    Examples:
      $ cratemae pretrain recipes/pretrain_base.toml
      $ cratemae pretrain recipes/pretrain_base.toml --set optim.lr=1e-4 --out runs/base
      $ cratemae pretrain recipes/pretrain_base.toml --resume never --json
    """
    load_recipe(recipe, set_ or [])
    parse_resume(resume)
    raise NotBuiltError("cratemae pretrain is not built yet")
