"""`cratemae probe`: linear-probe a pre-trained encoder."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import (
    DryRunOpt,
    GpuMemoryOpt,
    ImagesPerSecondOpt,
    JsonOpt,
    RecipeArg,
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
from cratemae.errors import BadInputError
from cratemae.fs import strict_json
from cratemae.recipe import load_recipe
from cratemae.rundir import RunFiles

__all__ = ["probe"]

# Also in `cratemae finetune` (TODO: one alias in _cli_utils).
OverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace what the run directory holds when it is the run "
                 "of another checkpoint (refused without it)."),
]


@preemptible
def probe(
    recipe: RecipeArg,
    checkpoint: Annotated[
        Path | None,
        typer.Option("--checkpoint", metavar="CKPT", show_default=False,
                     help="Checkpoint directory, run directory (its latest) or weights file."),
    ] = None,
    features: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--features", metavar="TRAIN VAL", show_default=False,
                     help="Probe the features `cratemae embed` wrote for the train and the "
                     "val split (two files) instead of computing them (no --checkpoint)."),
    ] = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", metavar="DIR", show_default=False,
                     help="Run directory (default: the recipe's run.out_dir if it sets one, "
                     "else runs/<checkpoint's run>-probe)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    dry_run: DryRunOpt = False,
    gpu_memory: GpuMemoryOpt = None,
    images_per_second: ImagesPerSecondOpt = None,
    world_size: WorldSizeOpt = None,
) -> None:
    """Linear-probe a pre-trained encoder.

    The encoder is frozen. probe.protocol "features" (the authors'): features of the
    centre-cropped image + logistic regression over a weight-decay grid chosen on a held-out
    part of data.train; "mae" (MAE's): BatchNorm + linear head trained with SGD or LARS
    (optim.name). Images are sized and normalised as the checkpoint was trained, unless the
    recipe sets model.img_size or data.mean/std. Writes probe.json (top1/top5 on data.val,
    the checkpoint's path and SHA-256) into runs/<checkpoint's run>-probe by default; a
    directory holding the probe of other weights is refused unless --overwrite. Features
    are cached in probe.cache_dir (default: $CRATEMAE_CACHE/features, else
    ~/.cache/cratemae/features); delete it to clear, or point probe.cache_dir at an empty
    folder to bypass it.

    Examples:
      $ cratemae probe probe/demo --checkpoint runs/demo       # into runs/demo-probe
      $ cratemae probe probe/cifar10 --checkpoint runs/base --set 'probe.pool="avg"'
      $ cratemae probe probe/pets --checkpoint runs/base --out runs/lin-pets --json
      $ torchrun --nproc-per-node 8 -m cratemae probe probe/in1k --checkpoint runs/base
      $ cratemae probe probe/cifar10 \
          --features c10-train.safetensors c10-val.safetensors
      $ cratemae probe probe/in1k --checkpoint runs/base --dry-run
    """
    r = load_recipe(recipe, set_ or [])
    if (checkpoint is None) == (features is None):
        raise BadInputError("give --checkpoint CKPT, or --features TRAIN VAL (files that "
                            "`cratemae embed` wrote), not both")
    if checkpoint is not None:
        require_checkpoint(checkpoint)
    for file in features or ():
        if not file.exists():
            raise BadInputError(f"{file}: --features file not found")
    if dry_run:
        check_plan_figures(gpu_memory, images_per_second)
        from cratemae.tasks.probe import plan_probe

        rank, world = launch_rank_world(world_size)
        show_plan(plan_probe(r, checkpoint, features=features, run_dir=out,
                             overwrite=overwrite, recipe_name=Path(recipe).stem, world=world,
                             rank=rank, gpu_memory=gpu_memory,
                             images_per_second=images_per_second,
                             rates=measured_rates()), json_=json_)
        return
    from cratemae.tasks.probe import probe as run_probe  # torch loads lazily

    with command_console("probe") as (on_progress, on_log):
        result = run_probe(r, checkpoint, features=features, run_dir=out,
                           overwrite=overwrite, recipe_name=Path(recipe).stem,
                           on_progress=on_progress, on_log=on_log)
    if not result.main_process:
        return
    s = result.summary
    if json_:
        # "out_dir" is the old name of "run_dir", kept for this release only.
        print(strict_json({k: v for k, v in s.items() if k != "recipe"} | {
            "run_dir": str(result.run_dir), "out_dir": str(result.run_dir)}))
        return
    rows = [("protocol", s["protocol"]), ("checkpoint", s["checkpoint"]),
            ("feature", f"{s['pool']} of layer {s['layer']}, {s['img_size']} px"),
            ("classes", str(s["num_classes"]))]
    if "weight_decay" in s:
        rows.append(("weight decay", f"{s['weight_decay']:g} (held-out top-1 "
                                     f"{max(g['holdout_top1'] for g in s['grid']):.2f}%)"))
    rows.append(("top-1", f"{s['top1']:.2f}%"))
    if s["top5"] is not None:  # none with 5 classes or fewer
        rows.append(("top-5", f"{s['top5']:.2f}%"))
    rows.append(("written", str(RunFiles(result.run_dir).probe)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(console.as_invoked(_next_steps(Path(recipe).stem, s["checkpoint"], result.run_dir)))


def _next_steps(recipe_stem: str, checkpoint: str, run_dir: Path) -> str:
    """What to run next, runnable where the user is: the shipped fine-tuning recipe of the
    same name (named, not as a path into a clone) on the same checkpoint, and the runs."""
    from cratemae.recipe.shipped import list_recipes

    lines = ["next:"]
    name = f"finetune/{recipe_stem}"
    if any(r.name == name for r in list_recipes()) and Path(checkpoint).exists():
        lines.append(f"  cratemae finetune {name} --checkpoint {shlex.quote(checkpoint)}")
    lines.append(f"  cratemae runs {shlex.quote(str(run_dir.parent))}")
    return "\n".join(lines)
