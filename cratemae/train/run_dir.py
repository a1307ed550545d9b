"""Writing a run directory while it runs: metrics.jsonl, the console's log.txt and status.json
(what the run is doing: running on which host and process, finished, stopped or failed).
The names are `cratemae.rundir`'s; `cratemae.train.runs` reads runs back."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from cratemae.errors import BadInputError
from cratemae.fs import atomic_write_json, atomic_write_text, strict_json
from cratemae.rundir import RunFiles

__all__ = ["MetricsLog", "log_file", "max_memory_gb", "recorded_source", "write_status"]

log = logging.getLogger("cratemae")


class MetricsLog:
    """Appends one JSON object per logged step to `metrics.jsonl`.

    On resume, lines for steps after the checkpoint (logged before an interruption) are
    dropped, so the file reads as one uninterrupted run. Lines carry `"kind": "train"` or
    `"kind": "eval"`; a line without a kind (older files) is a training line.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.last_train: dict[str, Any] | None = None  # the newest training line
        self.last_eval: dict[str, Any] | None = None  # the newest evaluation line
        if path.exists():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if resume_step is not None and record.get("step", 0) <= resume_step:
                    keep.append(line)
                    self._note(record)
            atomic_write_text(path, "".join(k + "\n" for k in keep))

    def _note(self, record: dict[str, Any]) -> None:
        if record.get("kind", "train") == "train":
            self.last_train = record
        elif record.get("kind") == "eval":
            self.last_eval = record

    def write(self, record: dict[str, Any]) -> None:
        self._note(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(strict_json(record) + "\n")  # a NaN loss: null, named
            f.flush()
            os.fsync(f.fileno())


class _QuietFileHandler(logging.FileHandler):
    """A log file that stops, silently, when it cannot be written (a full disk): the run's
    own error line says what failed, not a "--- Logging error ---" traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        self.setLevel(logging.CRITICAL + 1)


@contextmanager
def log_file(path: Path | None) -> Iterator[None]:
    """Copy the `cratemae` logger's lines (INFO and up) into the run's log file, if any."""
    if path is None:
        yield
        return
    logger = logging.getLogger("cratemae")
    handler = _QuietFileHandler(path, encoding="utf-8")
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


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Record what the run is doing (rank 0; `RunSetup.open_run_dir` is the one caller):
    "running" (with this host and process id), "finished", "stopped" (resumable) or
    "failed"."""
    record = {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
              "time": time.time(), **fields}
    atomic_write_json(RunFiles(run_dir).status, record)


_SOURCE_KEYS = ("checkpoint", "checkpoint_sha256")


def recorded_source(run_dir: Path, result: Path | None = None) -> dict[str, Any] | None:
    """The checkpoint the run in `run_dir` started from, as its result file (`result`) or
    else its status.json records it (`{"checkpoint": path, "checkpoint_sha256": digest}`,
    the digest absent in older runs); `{}` for a run that records none (a pre-training
    run); None for a directory that holds no run. A record that cannot be read (cut short,
    edited) is a `BadInputError` naming the file: whose run it is cannot be told."""
    files = RunFiles(run_dir)
    for file in (result, files.status):
        if file is None or not (file.exists() or file.is_symlink()):
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
            raise BadInputError(f"{file}: unreadable ({reason})") from None
        if not isinstance(data, dict):
            raise BadInputError(f"{file}: unreadable (not a JSON object)")
        found = {k: data[k] for k in _SOURCE_KEYS if isinstance(data.get(k), str)}
        if found:
            return found
    logged = _logged_source(files.log)  # a run older than these records: its log's line
    if logged is not None:
        return {"checkpoint": logged}
    has_result = result is not None and result.exists()
    return {} if files.is_run() or has_result or files.checkpoints.is_dir() else None


def _logged_source(log_path: Path) -> str | None:
    """The checkpoint that a probe's or fine-tune's first log line names ("probing X (...",
    "fine-tuning X (..."), as `cratemae runs` reads it; None without one."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            head = f.read(20000)
    except OSError:
        return None
    for marker in (" fine-tuning ", " probing "):
        if marker in head:
            return head.split(marker, 1)[1].split(" ", 1)[0] or None
    return None
