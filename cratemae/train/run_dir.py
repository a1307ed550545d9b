"""The run directory: resolved recipe, metrics.jsonl, the console log, checkpoints/."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cratemae.fs import atomic_write_text

__all__ = ["MetricsLog", "log_file", "max_memory_gb"]

log = logging.getLogger("cratemae")


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`.

    On resume, lines for steps after the checkpoint (logged before an interruption) are
    dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if path.exists():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if resume_step is not None and record.get("step", 0) <= resume_step:
                    keep.append(line)
            atomic_write_text(path, "".join(k + "\n" for k in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def log_file(path: Path | None) -> Iterator[None]:
    """Copy the `cratemae` logger's lines (INFO and up) into the run's log file, if any."""
    if path is None:
        yield
        return
    logger = logging.getLogger("cratemae")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.INFO)
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def max_memory_gb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident memory of this process (CPU), in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux
