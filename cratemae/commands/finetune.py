"""`cratemae finetune`: fine-tune a pre-trained encoder with a new classification head."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import (
    CheckpointOpt,
    DryRunOpt,
    GpuMemoryOpt,
    ImagesPerSecondOpt,
    JsonOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    WorldSizeOpt,
    check_plan_figures,
    command_console,
    launch_rank_world,
    measured_rates,
    preemptible,
    require_checkpoint,
    show_plan,
)
from cratemae.fs import strict_json
from cratemae.recipe import load_recipe
from cratemae.rundir import RunFiles

__all__ = ["finetune"]

# Also in `cratemae probe` (TODO: one alias in _cli_utils).
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace the run in the run directory when it is the "
                 "fine-tune of another checkpoint (refused without it): its checkpoints, "
                 "best weights and result are removed, and training starts afresh."),
]


@preemptible
def finetune(
    recipe: RecipeArg,
    checkpoint: CheckpointOpt,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", show_default=False,
                     help="Run directory (default: the recipe's run.out_dir if it sets one, "
                     "else runs/<checkpoint's run>-finetune)."),
    ] = None,
    resume: ResumeOpt = "auto",
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
    gpu_memory: GpuMemoryOpt = None,
    images_per_second: ImagesPerSecondOpt = None,
    world_size: WorldSizeOpt = None,
) -> None:
    """Fine-tune a pre-trained encoder with a new classification head.

    Layer-wise lr decay, AdamW, warm-up + cosine, label smoothing, mixup/cutmix, RandAugment,
    random erasing and optionally an EMA of the weights; data.val is evaluated every epoch.
    The run directory holds recipe.toml, metrics.jsonl, log.txt, checkpoints/ (the last
    ones), best/ (the best weights) and finetune.json (final and best top1/top5, the
    checkpoint's path and SHA-256); by default it is runs/<checkpoint's run>-finetune. A
    run directory holding the fine-tune of other weights is refused unless --overwrite.
    Images are sized and normalised as the checkpoint was trained, unless the recipe sets
    model.img_size or data.mean/std. Exit status 3: stopped by SIGTERM/SIGUSR1 after
    saving; run the same command to resume.

    Examples:
      $ cratemae finetune finetune/demo --checkpoint runs/demo   # into runs/demo-finetune
      $ cratemae finetune finetune/cifar10 --checkpoint runs/base --out runs/ft
      $ torchrun --nproc-per-node 8 -m cratemae finetune finetune/in1k --checkpoint runs/base
      $ cratemae finetune finetune/demo --checkpoint runs/demo --resume never --json
      $ cratemae finetune finetune/in1k --checkpoint runs/base --dry-run --world-size 8
    """
    r = load_recipe(recipe, set_ or [])
    require_checkpoint(checkpoint)
    from cratemae.checkpoints import Resume  # torch loads lazily
    from cratemae.tasks.finetune import finetune as run_finetune

    where = Resume.parse(resume)
    if dry_run:
        check_plan_figures(gpu_memory, images_per_second)
        from cratemae.tasks.finetune import plan_finetune

        rank, world = launch_rank_world(world_size)
        show_plan(plan_finetune(r, checkpoint, run_dir=out, resume=where, overwrite=overwrite,
                                recipe_name=Path(recipe).stem, world=world, rank=rank,
                                gpu_memory=gpu_memory, images_per_second=images_per_second,
                                rates=measured_rates()),
                  json_=json_)
        return
    with command_console("finetune") as (_, on_log):
        result = run_finetune(r, checkpoint, run_dir=out, resume=where, overwrite=overwrite,
                              recipe_name=Path(recipe).stem, on_log=on_log)
    if not result.main_process:
        return
    final = result.evals[-1] if result.evals else {}
    best = result.best or {}
    if json_:
        print(strict_json({"run_dir": str(result.run_dir), "final": final, "best": best,
                           "last_checkpoint": str(result.last_checkpoint),
                           "steps": result.state.step}))
        return
    run, files = result.run_dir, RunFiles(result.run_dir)
    classes = _num_classes(files.finetune)
    print(f"final  {_scores(final, classes)}  (step {result.state.step})")
    print(f"best   {_scores(best, classes)}  ({best.get('path', '-')})")
    if result.finished_before:
        print(f"already finished at step {result.state.step}: nothing to train")
    written = [files.finetune.name, f"{files.best.name}/ (the best weights)",
               f"{result.last_checkpoint} (last checkpoint)", files.metrics.name, files.log.name]
    written += [f"{files.tensorboard.name}/"] if files.tensorboard.is_dir() else []
    print(f"written in {run}: " + ", ".join(written))
    print(console.as_invoked("next:\n  cratemae export "
          f"{shlex.quote(str(files.best_model))} --out {shlex.quote(f'exported/{run.name}')}"
          + (f"\n  tensorboard --logdir {shlex.quote(str(files.tensorboard))}"
             if files.tensorboard.is_dir() else "")
          + f"\n  cratemae runs {shlex.quote(str(run.parent))}"))


def _num_classes(result: Path) -> int | None:
    try:
        found = json.loads(result.read_text(encoding="utf-8")).get("num_classes")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, int) else None


def _scores(evaluation: dict, classes: int | None) -> str:
    """`top-1 68.10%  top-5 95.00%`; top-5 left out with 5 classes or fewer (always 100%)."""
    text = f"top-1 {evaluation.get('top1', float('nan')):.2f}%"
    top5 = evaluation.get("top5")
    if top5 is not None and not (classes is not None and classes <= 5):
        text += f"  top-5 {top5:.2f}%"
    return text
