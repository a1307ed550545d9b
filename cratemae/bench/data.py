"""Data throughput: how many images per second the loader delivers, and the CPU it takes."""

from __future__ import annotations

import os
import resource
import time
from typing import Literal

from cratemae.data.loader import build_loader
from cratemae.errors import BadInputError
from cratemae.recipe.schema import DataSection

__all__ = ["bench_data"]


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished (joined) children."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


# What each task reads: its augmentation, and whether samples must carry labels.
TASK_LOADING = {
    "pretrain": ("crop", False),
    "probe": ("crop", True),
    "finetune": ("randaugment", True),
    "eval": ("none", True),
}


def bench_data(
    data: DataSection,
    img_size: int,
    num_workers: int,
    batches: int,
    *,
    task: Literal["pretrain", "probe", "finetune", "eval"] = "pretrain",
    split: str = "train",
    seed: int = 0,
) -> dict:
    """Run the loader for up to `batches` batches; images/s from the first batch's arrival
    to the last (start-up is reported apart), and CPU cores used over the whole run."""
    if task not in TASK_LOADING:
        raise BadInputError(f"task {task!r}: must be one of {', '.join(TASK_LOADING)}")
    if num_workers < 0 or batches < 1 or img_size < 1:
        raise BadInputError(f"num_workers {num_workers}, batches {batches}, img_size "
                            f"{img_size}: need num_workers >= 0, batches >= 1, img_size >= 1")
    data = data.model_copy(update={"num_workers": num_workers})
    augment, labels = TASK_LOADING[task]
    loader = build_loader(data, split=split, augment=augment, labels=labels,  # type: ignore[arg-type]
                          img_size=img_size, seed=seed, epoch=0)
    n = min(batches, len(loader))
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    t_first, images, it = t0, 0, iter(loader)
    try:
        for i, batch in enumerate(it):
            if i == 0:
                t_first = time.perf_counter()
            else:
                images += len(batch)
            if i + 1 >= n:
                break
    finally:
        it.close()  # joins the workers, so their CPU time is counted
    t_end = time.perf_counter()
    cpu = _cpu_seconds() - cpu0
    steady = max(t_end - t_first, 1e-9)
    return {
        "images_per_s": images / steady if images else 0.0,
        "batches": n,
        "batch_size": data.batch_size,
        "img_size": img_size,
        "num_workers": num_workers,
        "startup_s": t_first - t0,
        "seconds": t_end - t0,
        "cpu_cores_used": cpu / (t_end - t0),
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "bad": loader.bad,
    }
