"""`cratemae bench-data`: measure how fast the data pipeline delivers images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import SetOpt
from cratemae.errors import BadInputError
from cratemae.fs import strict_json

if TYPE_CHECKING:
    from cratemae.recipe import Recipe

__all__ = ["bench_data"]

DEFAULT_IMG_SIZE = 224  # without a recipe


def bench_data(
    recipe: Annotated[
        Path | None, typer.Argument(metavar="RECIPE", help="Recipe whose data section to use.")
    ] = None,
    set_: SetOpt = None,
    data: Annotated[
        str | None, typer.Option(metavar="SHARDS",
                                 help="Data to read instead of the recipe's data.train.")
    ] = None,
    task: Annotated[str, typer.Option(metavar="pretrain|probe|finetune|eval",
                                      help="Which task's reading and augmentation.")
                    ] = "pretrain",
    img_size: Annotated[
        int | None,
        typer.Option(help="Output image size (default: the recipe's model image size; "
                     "224 without a recipe).", show_default=False),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default: the recipe's.")] = None,
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    batches: Annotated[int, typer.Option(help="Batches to time.")] = 50,
    target_rate: Annotated[
        float | None,
        typer.Option(metavar="N", help="Images/s to feed (per rank): say how many workers it "
                     "takes. Default: the rate `cratemae bench` recorded for the recipe's "
                     "model on this device, if any.", show_default=False),
    ] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Measure the data pipeline's throughput (images/s, and per worker) and the CPU cores
    it uses; say how many workers would feed a target rate.

    Reads, decodes and augments like training does, without a model, so the number is the
    most a GPU can be fed with these workers. Without a recipe it reads the demo data. The
    per-worker figure is recorded for this CPU and data (in the cache folder) so that a dry
    run can say how many workers a run needs.

    Examples:
      $ cratemae bench-data --img-size 32
      $ cratemae bench-data recipes/base.toml --num-workers 8 --batches 100
      $ cratemae bench-data recipes/base.toml --num-workers 2 --target-rate 3000
      $ cratemae bench-data --data '/data/in1k/train-{000000..001023}.tar' --task finetune
    """
    _check_options(task, img_size, batch_size, num_workers, batches)
    if target_rate is not None and not 1e-3 <= target_rate <= 1e9:  # nan fails both
        raise BadInputError(f"--target-rate {target_rate:g}: must be from 0.001 to 1e+09 "
                            "(images/s)")
    from cratemae.bench.data import bench_data as run_bench
    from cratemae.bench.data import (
        data_key,
        model_key,
        record_rate,
        recorded_rate,
        workers_needed,
    )
    from cratemae.recipe import load_recipe
    from cratemae.recipe.schema import DataSection

    loaded = load_recipe(recipe, set_ or []) if recipe else None
    section = loaded.data if loaded else DataSection(train="demo:train")
    if img_size is None:
        img_size = _recipe_img_size(loaded) if loaded else DEFAULT_IMG_SIZE
    update: dict[str, object] = {"train": data} if data else {}
    if batch_size is not None:
        update["batch_size"] = batch_size
    section = DataSection.model_validate({**section.model_dump(), **update})
    result = run_bench(section, img_size, num_workers, batches, task=task)  # type: ignore[arg-type]
    per_worker = result["per_worker_images_per_s"]
    if per_worker > 0:
        record_rate(data_key(section, img_size, task), per_worker)
    target, source = target_rate, "--target-rate"
    if target is None and loaded is not None:
        target = recorded_rate(model_key(loaded.model.name, img_size))
        source = f"cratemae bench's figure for {loaded.model.name} on this device"
    if target is not None and per_worker > 0:
        result.update(target_rate=target, workers_needed=workers_needed(target, per_worker))
    if json_:
        print(strict_json(result))
        return
    console.log(
        f"{result['images_per_s']:.0f} images/s at {img_size}px, batch {result['batch_size']}, "
        f"{num_workers} workers ({per_worker:.0f} per worker); {result['cpu_cores_used']:.2f} "
        f"of {result['cpu_cores_available']} CPU cores used; start-up {result['startup_s']:.1f}s"
    )
    if "workers_needed" in result:
        console.log(f"{result['workers_needed']} workers per rank would feed {target:,.0f} "
                    f"images/s ({source})")


# Beyond these an option is a typo, and would fork thousands of processes or ask for
# terabytes before failing.
MAX_WORKERS = 512
MAX_BATCH = 1 << 16
MAX_IMG_SIZE = 8192


def _check_options(task: str, img_size: int | None, batch_size: int | None,
                   num_workers: int, batches: int) -> None:
    """Each option in its range before any work: one `error:` line, exit 2."""
    from cratemae.bench.data import TASK_LOADING

    if task not in TASK_LOADING:
        raise BadInputError(f"--task {task}: must be one of {', '.join(TASK_LOADING)}")
    for flag, value, low, high in (("--img-size", img_size, 1, MAX_IMG_SIZE),
                                   ("--batch-size", batch_size, 1, MAX_BATCH),
                                   ("--num-workers", num_workers, 0, MAX_WORKERS),
                                   ("--batches", batches, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise BadInputError(f"{flag} {value}: must be {bound}")


def _recipe_img_size(recipe: Recipe) -> int:
    """The image size the recipe's model takes: model.img_size, else its preset's."""
    from cratemae.model.factory import preset_config

    if recipe.model.img_size is not None:
        return int(recipe.model.img_size)
    return preset_config(recipe.model.name).img_size
