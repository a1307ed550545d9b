"""`cratemae probe`: linear-probe a pre-trained encoder (stub until the prober lands)."""

from __future__ import annotations

from cratemae.commands.options import (
    CheckpointOpt,
    JsonOpt,
    OutOpt,
    RecipeArg,
    SetOpt,
    require_file,
)
from cratemae.errors import NotBuiltError
from cratemae.recipe import load_recipe

__all__ = ["probe"]


def probe(
    recipe: RecipeArg,
    checkpoint: CheckpointOpt,
    set_: SetOpt = None,
    out: OutOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Linear-probe a pre-trained encoder.

    Examples:
      $ cratemae probe recipes/probe_in1k.toml --checkpoint runs/base/last.pt
      $ cratemae probe recipes/probe_in1k.toml --checkpoint runs/base/last.pt --set optim.lr=0.1
      $ cratemae probe recipes/probe_in1k.toml --checkpoint runs/base/last.pt --json
    """
    load_recipe(recipe, set_ or [])
    require_file(checkpoint, "checkpoint")
    raise NotBuiltError("cratemae probe is not built yet")
