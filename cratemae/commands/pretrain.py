"""`cratemae pretrain`: pre-train CRATE-MAE from a recipe."""

from __future__ import annotations

import json

from cratemae.commands._cli_utils import (
    JsonOpt,
    OutOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    command_console,
)
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

    Writes the resolved recipe, metrics.jsonl, log.txt and checkpoints/ into the run
    directory. Exit status 3 means: stopped by SIGTERM/SIGUSR1 after saving; run the same
    command again to resume.

    Examples:
      $ cratemae pretrain recipes/demo.toml
      $ cratemae pretrain recipes/base.toml --set optim.base_lr=1e-4 --out runs/base
      $ torchrun --nproc-per-node 8 -m cratemae pretrain recipes/base.toml
      $ cratemae pretrain recipes/base.toml --resume never --json
    """
    r = load_recipe(recipe, set_ or [])
    from cratemae.checkpoints import Resume  # torch loads lazily
    from cratemae.tasks.pretrain import pretrain as run_pretrain

    where = Resume.parse(resume)
    with command_console("pretrain") as (_, on_log):
        result = run_pretrain(r, out_dir=out, resume=where, on_log=on_log)
    if json_ and result.main_process:
        print(json.dumps({
            "run_dir": str(result.run_dir),
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "final_loss": result.final_loss,
            "steps": result.state.step,
        }))

