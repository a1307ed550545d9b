"""The dry run's time: wall time per epoch and for the run at a rate, and the data workers
per rank that feed it, from the figures `cratemae bench` and `cratemae bench-data` recorded
on this machine (`Rates`). Rows of the run's `Plan` (`cratemae.train.plan`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cratemae.data.plan import workers_needed
from cratemae.recipe.schema import DataSection
from cratemae.train.plan import Plan

__all__ = ["Rates", "plan_time"]


@dataclass(frozen=True)
class Rates:
    """Figures measured on this machine, None where nothing was: `model(name, img_size)`,
    the training images/s per rank that `cratemae bench` recorded for that preset and size
    on this device; `data(data, img_size, task)`, the images/s one data worker delivers as
    `cratemae bench-data` recorded it for that data, size and task. The commands look them
    up (`cratemae.bench.data`); the plan only reads them."""

    model: Callable[[str, int], float | None]
    data: Callable[[DataSection, int, str], float | None]



def plan_time(plan: Plan, images_per_second: float | None, *, rates: Rates | None = None,
              model: str = "", img_size: int = 0, data: DataSection | None = None,
              task: str = "pretrain") -> None:
    """Wall time per epoch and for the run at `images_per_second` per rank (else the figure
    `cratemae bench` recorded for `model` at `img_size` on this device), and the data
    workers per rank that feed that rate at the per-worker figure `cratemae bench-data`
    recorded for `data` (`task`: bench-data's task of the run's loading)."""
    if plan.steps is None or plan.samples_per_rank is None:
        return
    source = f"{images_per_second:g} img/s per rank" if images_per_second else ""
    if images_per_second is None and rates is not None and model:
        images_per_second = rates.model(model, img_size)
        source = (f"{images_per_second:g} img/s per rank, `cratemae bench`'s figure for "
                  f"{model} at {img_size} px on this device") if images_per_second else ""
    if images_per_second is None:
        plan.add("Time", "estimate", None, "give --images-per-second N (one rank's figure "
                 "from `cratemae bench`) for the wall time")
        return
    s = plan.steps
    images = s.steps_per_epoch * s.accum * (plan.samples_per_rank
                                            // max(1, s.steps_per_epoch * s.accum))
    epoch = images / images_per_second
    done = plan.resume_step
    run = max(0, s.total_steps - done) / s.steps_per_epoch * epoch
    plan.add("Time", "per_epoch_s", epoch, f"{_hours(epoch)} at {source}")
    plan.add("Time", "run_s", run, _hours(run) + (f" (from step {done:,})" if done else ""))
    per_worker = rates.data(data, img_size, task) if rates is not None and data else None
    if per_worker is None:
        plan.add("Time", "data_workers", None, "run `cratemae bench-data RECIPE` on a node "
                 "like the run's for the data workers this rate needs")
        return
    need, have = workers_needed(images_per_second, per_worker), data.num_workers  # type: ignore[union-attr]
    text = (f"{need} per rank feed {images_per_second:g} img/s at {per_worker:g} img/s per "
            f"worker (`cratemae bench-data`'s figure); the recipe has {have}")
    if need > max(1, have):
        text += (f": the accelerator would wait on data; data.num_workers = {need}, or "
                 'data.decode = "gpu"')
    plan.add("Time", "data_workers", need, text)


def _hours(seconds: float) -> str:
    h, rest = divmod(round(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"
