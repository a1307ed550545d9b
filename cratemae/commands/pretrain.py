"""`cratemae pretrain`: pre-train CRATE-MAE from a recipe."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from typing import Any

from cratemae.commands import console
from cratemae.commands.options import JsonOpt, OutOpt, RecipeArg, ResumeOpt, SetOpt, parse_resume
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
    where = parse_resume(resume)
    from cratemae.engine.dist import parse_launch_env  # torch loads lazily
    from cratemae.engine.pretrain import pretrain as run_pretrain

    main = parse_launch_env(os.environ).rank == 0
    with _console_logging(main) as on_log:
        result = run_pretrain(r, out_dir=out, resume=str(where), on_log=on_log)
    if json_ and result.main_process:
        print(json.dumps({
            "run_dir": str(result.run_dir),
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "final_loss": result.final_loss,
            "steps": result.state.step,
        }))


@contextmanager
def _console_logging(main: bool):
    """Library log lines to the console; a progress bar on a terminal, plain lines otherwise.
    Ranks other than 0 show only warnings and errors, so a launch prints each line once."""
    logger = logging.getLogger("cratemae")
    interactive = main and console.is_interactive()
    handler = console.LogHandler(hide_metrics=interactive)
    if not main:
        handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if not interactive:
            yield lambda record: None
            return
        with console.progress(None, "pretrain") as bar:
            def on_log(record: dict[str, Any]) -> None:
                bar.set(record["step"], record.get("total_steps"),
                        f"loss {record['loss']:.4f} {record['images_per_s']:.0f} img/s")
            yield on_log
    finally:
        logger.removeHandler(handler)
