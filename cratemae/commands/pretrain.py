"""`cratemae pretrain`: pre-train CRATE-MAE from a recipe."""

from __future__ import annotations

from typing import Any

from cratemae.commands import console
from cratemae.commands._cli_utils import (
    DryRunOpt,
    GpuMemoryOpt,
    ImagesPerSecondOpt,
    JsonOpt,
    OutOpt,
    RecipeArg,
    ResumeOpt,
    SetOpt,
    WorldSizeOpt,
    check_plan_figures,
    command_console,
    launch_rank_world,
    measured_rates,
    preemptible,
    show_plan,
)
from cratemae.fs import strict_json
from cratemae.recipe import load_recipe
from cratemae.rundir import RunFiles

__all__ = ["pretrain"]


@preemptible
def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    out: OutOpt = None,
    resume: ResumeOpt = "auto",
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
    gpu_memory: GpuMemoryOpt = None,
    images_per_second: ImagesPerSecondOpt = None,
    world_size: WorldSizeOpt = None,
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
      $ cratemae pretrain recipes/base.toml --dry-run --world-size 8 --gpu-memory 80
    """
    r = load_recipe(recipe, set_ or [])
    from cratemae.checkpoints import Resume  # torch loads lazily
    from cratemae.tasks.pretrain import pretrain as run_pretrain

    where = Resume.parse(resume)
    if dry_run:
        check_plan_figures(gpu_memory, images_per_second)
        from cratemae.tasks.pretrain import plan_pretrain

        rank, world = launch_rank_world(world_size)
        show_plan(plan_pretrain(r, run_dir=out, resume=where, world=world, rank=rank,
                                gpu_memory=gpu_memory, images_per_second=images_per_second,
                                rates=measured_rates()),
                  json_=json_)
        return
    with command_console("pretrain") as (_, on_log):
        result = run_pretrain(r, run_dir=out, resume=where, on_log=on_log)
    if json_ and result.main_process:
        print(strict_json({
            "run_dir": str(result.run_dir),
            "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "final_loss": result.final_loss,
            "steps": result.state.step,
            "already_finished": result.finished_before,
        }))
    elif result.main_process:
        print(console.as_invoked(_the_end(result, r.data.train)))


def _the_end(result: Any, train: Any) -> str:
    """What the run wrote and the commands that naturally follow, runnable where the user
    is: shipped recipes by name, never a path into the source tree."""
    run, loss = result.run_dir, result.final_loss
    loss_text = "n/a" if loss is None else f"{loss:.4f}"
    if result.finished_before:
        head = (f"already finished: step {result.state.step} of {result.total_steps}, "
                f"final loss {loss_text}; nothing to train")
    else:
        head = f"finished: step {result.state.step} of {result.total_steps}, loss {loss_text}"
    if result.recovery_note:
        head += f" ({result.recovery_note} after non-finite losses)"
    files = RunFiles(run)
    written = [f"{result.last_checkpoint} (last checkpoint)", files.metrics.name, files.log.name]
    written += [f"{d.name}/" for d in (files.tensorboard, files.samples) if d.is_dir()]
    return "\n".join([
        head, f"written in {run}: " + ", ".join(written), "next:",
        *_probe_lines(run, train),
        f"  cratemae reconstruct IMAGE --checkpoint {run}",
        f"  cratemae export {run} --out exported/{run.name}",
        f"  tensorboard --logdir {files.tensorboard}"
        if files.tensorboard.is_dir() else f"  cratemae runs {run.parent}",
    ])


def _probe_lines(run: Any, train: Any) -> list[str]:
    """The linear probe that fits the run's data: the demo's on the demo data, ImageNet's on
    ImageNet; otherwise the demo recipe pointed at labelled data of the user's own."""
    where = str(train or "").lower()
    if where.startswith("demo:"):
        return [f"  cratemae probe probe/demo --checkpoint {run}"]
    if any(name in where for name in ("imagenet", "in1k", "ilsvrc")):
        return [f"  cratemae probe probe/in1k --checkpoint {run}"]
    return [f"  cratemae probe probe/demo --checkpoint {run} "
            f"--set data.train=LABELLED_TRAIN --set data.val=LABELLED_VAL",
            "    (labelled folders or shards; or `cratemae recipes copy probe/demo probe.toml` "
            "and edit it)"]
