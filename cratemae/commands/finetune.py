"""`cratemae finetune`: fine-tune a pre-trained encoder with a new classification head."""

from __future__ import annotations

from cratemae.commands._cli_utils import (
    CheckpointOpt,
    JsonOpt,
    OutOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    command_console,
    preemptible,
    require_checkpoint,
)
from cratemae.fs import strict_json
from cratemae.recipe import load_recipe
from cratemae.rundir import RunFiles

__all__ = ["finetune"]


@preemptible
def finetune(
    recipe: RecipeArg,
    checkpoint: CheckpointOpt,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Fine-tune a pre-trained encoder with a new classification head.

    Layer-wise lr decay, AdamW, warm-up + cosine, label smoothing, mixup/cutmix, RandAugment,
    random erasing and optionally an EMA of the weights; data.val is evaluated every epoch.
    The run directory holds recipe.toml, metrics.jsonl, log.txt, checkpoints/ (the last
    ones), best/ (the best weights) and finetune.json (final and best top1/top5). Exit
    status 3: stopped by SIGTERM/SIGUSR1 after saving; run the same command to resume.

    Examples:
      $ cratemae finetune recipes/finetune/demo.toml --checkpoint runs/demo
      $ cratemae finetune recipes/finetune/cifar10.toml --checkpoint runs/base --out runs/ft
      $ torchrun --nproc-per-node 8 -m cratemae finetune recipes/finetune/in1k.toml --checkpoint B
      $ cratemae finetune recipes/finetune/demo.toml --checkpoint runs/demo --resume never --json
    """
    r = load_recipe(recipe, set_ or [])
    require_checkpoint(checkpoint)
    from cratemae.checkpoints import Resume  # torch loads lazily
    from cratemae.tasks.finetune import finetune as run_finetune

    where = Resume.parse(resume)
    with command_console("finetune") as (_, on_log):
        result = run_finetune(r, checkpoint, run_dir=out, resume=where, on_log=on_log)
    if not result.main_process:
        return
    final = result.evals[-1] if result.evals else {}
    best = result.best or {}
    if json_:
        print(strict_json({"run_dir": str(result.run_dir), "final": final, "best": best,
                           "last_checkpoint": str(result.last_checkpoint),
                           "steps": result.state.step}))
        return
    print(f"final  top-1 {final.get('top1', float('nan')):.2f}%  "
          f"top-5 {final.get('top5', float('nan')):.2f}%  (step {result.state.step})")
    print(f"best   top-1 {best.get('top1', float('nan')):.2f}%  "
          f"top-5 {best.get('top5', float('nan')):.2f}%  ({best.get('path', '-')})")
    run, files = result.run_dir, RunFiles(result.run_dir)
    if result.finished_before:
        print(f"already finished at step {result.state.step}: nothing to train")
    written = [files.finetune.name, f"{files.best.name}/ (the best weights)",
               f"{result.last_checkpoint} (last checkpoint)", files.metrics.name, files.log.name]
    written += [f"{files.tensorboard.name}/"] if files.tensorboard.is_dir() else []
    print(f"written in {run}: " + ", ".join(written))
    print(f"next:\n  cratemae export {files.best_model} --out exported/{run.name}"
          + (f"\n  tensorboard --logdir {files.tensorboard}"
             if files.tensorboard.is_dir() else "")
          + f"\n  cratemae runs {run.parent}")
