"""Data throughput: how many images per second the loader delivers, and the CPU it takes;
how many workers a rate needs, and the figures measured on this machine.

Figures are kept in `cache_dir()/bench-records.json`, one per key: "data" keys name the CPU,
the task, the image size and the data (`data_key`), with images/s per worker, as
`cratemae bench-data` measured them; "model" keys name the device, the model preset and the
image size (`model_key`), with training images/s, for `cratemae bench` to record. A dry
run reads both (`recorded_rate`) to say how many workers a run needs (`workers_needed`).
Two processes recording at once may lose one of the two figures (the file is replaced
whole, atomically), never corrupt the file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import time
from pathlib import Path
from typing import Literal

import torch

from cratemae.data.cache import cache_dir
from cratemae.data.loader import build_loader
from cratemae.data.plan import workers_needed
from cratemae.errors import BadInputError
from cratemae.fs import atomic_write_json
from cratemae.guard import special_kind
from cratemae.recipe.schema import DataSection

__all__ = ["bench_data", "data_key", "model_key", "record_rate", "recorded_rate",
           "workers_needed"]

log = logging.getLogger("cratemae.bench")
RECORDS_NAME = "bench-records.json"
MIN_RATE, MAX_RATE = 1e-3, 1e9  # images/s a figure can be: outside, a record is junk


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
        # 0 workers: the main process is the one worker
        "per_worker_images_per_s": (images / steady if images else 0.0) / max(1, num_workers),
    }


def cpu_name() -> str:
    """This machine's CPU model ("AMD EPYC 7R13 Processor"), as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str | None = None) -> str:
    """The accelerator's name ("NVIDIA H100 80GB HBM3"), or the CPU's without one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def data_key(data: DataSection, img_size: int, task: str) -> str:
    """The key of a per-worker data figure: this CPU, the task, the image size, the data."""
    train = data.train if isinstance(data.train, str) else json.dumps(data.train, allow_nan=False)
    return f"data|{cpu_name()}|{task}|{img_size}|{train}"


def model_key(model: str, img_size: int, device: torch.device | str | None = None) -> str:
    """The key of a training figure: the device's name, the model preset, the image size."""
    return f"model|{device_name(device)}|{model}|{img_size}"


def _records_path() -> Path:
    return cache_dir() / RECORDS_NAME


def _records() -> dict:
    """The recorded figures; none when the file is missing, unreadable, not a regular file
    (a FIFO there is never opened: it would block) or not a JSON object."""
    path = _records_path()
    if special_kind(path) is not None or path.is_dir():
        log.warning("%s: not a regular file; no recorded figures", path)
        return {}
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: no figures
        return {}
    return found if isinstance(found, dict) else {}


def recorded_rate(key: str) -> float | None:
    """The images/s last recorded under `key` (`data_key`: per worker; `model_key`: per
    device), or None when there is none."""
    entry = _records().get(key)
    value = entry.get("images_per_s") if isinstance(entry, dict) else None
    ok = (isinstance(value, int | float) and not isinstance(value, bool)
          and MIN_RATE <= value <= MAX_RATE)  # nan, inf, 0 and a 400-digit int are junk
    return float(value) if ok else None


def record_rate(key: str, images_per_s: float) -> bool:
    """Record `images_per_s` under `key`; False (and a warning) when the cache is not
    writable: a benchmark's figure is never worth failing for."""
    if special_kind(_records_path()) is not None or _records_path().is_dir():
        log.warning("could not record the figure: %s is not a regular file", _records_path())
        return False
    records = _records()
    records[key] = {"images_per_s": float(images_per_s), "time": time.time()}
    try:
        _records_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(_records_path(), records)
    except OSError as err:
        log.warning("could not record the figure in %s: %s", _records_path(), err)
        return False
    return True
