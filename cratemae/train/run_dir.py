"""The run directory: resolved recipe, metrics.jsonl, the console log, checkpoints/, and
status.json (what the run is doing: running on which host and process, finished, stopped
or failed), which `describe_run` reads back for `cratemae runs`."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cratemae.errors import BadInputError
from cratemae.fs import atomic_write_json, atomic_write_text, strict_json
from cratemae.train.lock import lock_holder

__all__ = ["LIVE_SECONDS", "MetricsLog", "RunInfo", "describe_run", "find_runs", "log_file",
           "max_memory_gb", "read_metrics", "write_status"]

STATUS = "status.json"
# A run whose log.txt changed this recently counts as running when its process cannot be
# checked (another host): a live run logs every `run.log_every` steps.
LIVE_SECONDS = 600

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
    """Record what the run is doing (rank 0): "running" (with this host and process id),
    "finished", "stopped" (resumable) or "failed"."""
    record = {"state": state, "host": socket.gethostname(), "pid": os.getpid(),
              "time": time.time(), **fields}
    atomic_write_json(run_dir / STATUS, record)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl (none if absent); a line cut short is skipped."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


@dataclass
class RunInfo:
    """What `cratemae runs` shows of one run directory."""

    path: str
    kind: str  # "pre-train", "fine-tune" or "probe"
    model: str | None
    step: int | None
    total_steps: int | None
    loss: float | None  # the last training line's
    val_loss: float | None
    val_knn_top1: float | None
    top1: float | None  # fine-tuning's and probing's last evaluation
    state: str  # "running", "finished", "stopped" (resumable) or "failed"
    detail: str  # why: the process, the error, the age of the log
    last_checkpoint: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (itself included): those holding a recipe.toml."""
    if (root / "recipe.toml").is_file():
        return [root]
    return sorted(p.parent for p in root.rglob("recipe.toml")
                  if "checkpoints" not in p.parent.parts and "best" not in p.parent.parts)


def describe_run(run_dir: Path, now: float | None = None) -> RunInfo:
    """Read a run directory back: its kind, progress, last figures and state."""
    from cratemae.checkpoints.resolve import ckpt_dir_of, complete_checkpoints

    now = time.time() if now is None else now
    kind, model = _kind_and_model(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    try:
        found = complete_checkpoints(ckpt_dir_of(run_dir)) if (
            run_dir / "checkpoints").is_dir() else []
    except BadInputError:  # a checkpoint edited into nonsense: the run reads as stopped there
        found = []
    last_ckpt, ckpt_step = (found[-1][0], int(found[-1][1].get("step", 0))) if found \
        else (None, None)
    last = train[-1] if train else {}
    total = last.get("total_steps")
    step = max((s for s in (last.get("step"), ckpt_step) if s is not None), default=None)
    val = next((r for r in reversed(evals) if "val_loss" in r), {})
    scored = next((r for r in reversed(evals) if "top1" in r), {})
    top1 = scored.get("top1")
    if kind == "probe" and (run_dir / "probe.json").is_file():
        top1 = _read_json(run_dir / "probe.json").get("top1", top1)
    state, detail = _state(run_dir, kind, step, total, ckpt_step, now)
    return RunInfo(str(run_dir), kind, model, step, total, last.get("loss"),
                   val.get("val_loss"), val.get("val_knn_top1"), top1, state, detail,
                   str(last_ckpt) if last_ckpt is not None else None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kind_and_model(run_dir: Path) -> tuple[str, str | None]:
    """Pre-training names its model in the recipe; fine-tuning and probing take theirs
    from a checkpoint, which their log's first line names."""
    head = ""
    if (run_dir / "log.txt").is_file():
        with open(run_dir / "log.txt", encoding="utf-8", errors="replace") as f:
            head = f.read(20000)
    for kind, marker, done in (("fine-tune", " fine-tuning ", "finetune.json"),
                               ("probe", " probing ", "probe.json")):
        if marker in head or (run_dir / done).is_file():
            source = _read_json(run_dir / done).get("checkpoint")
            if source is None and marker in head:
                source = head.split(marker, 1)[1].split(" ", 1)[0]
            return kind, f"encoder of {source}" if source else None
    try:
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "pre-train", None
    return "pre-train", recipe.get("model", {}).get("name", "crate_mae_base")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _state(run_dir: Path, kind: str, step: int | None, total: int | None,
           ckpt_step: int | None, now: float) -> tuple[str, str]:
    holder = lock_holder(run_dir)  # the lock is the authority: held only by a live process
    if holder is not None:
        return "running", f"lock held by {holder}"
    status = _read_json(run_dir / STATUS)
    done_file = {"fine-tune": "finetune.json", "probe": "probe.json"}.get(kind)
    log_age = now - (run_dir / "log.txt").stat().st_mtime if (run_dir / "log.txt").is_file() \
        else None
    resumable = ckpt_step is not None
    if status.get("state") == "failed":
        return "failed", str(status.get("error", ""))
    if status.get("state") == "stopped":
        return "stopped", f"resumable from step {ckpt_step}" if resumable else "no checkpoint"
    finished = (done_file is not None and (run_dir / done_file).is_file()) or (
        kind == "pre-train" and total is not None and ckpt_step == total)
    if status.get("state") == "finished" or (finished and status.get("state") != "running"):
        return "finished", ""
    if status.get("state") == "running":
        host, pid = status.get("host"), int(status.get("pid", 0))
        if host == socket.gethostname():
            if _pid_alive(pid):
                return "running", f"process {pid} on {host}"
            return _ended(resumable, ckpt_step, f"process {pid} on {host} is gone")
        if log_age is not None and log_age < LIVE_SECONDS:
            return "running", f"process {pid} on {host}, log.txt written {log_age:.0f} s ago"
        return _ended(resumable, ckpt_step, f"no log line for {(log_age or 0) / 60:.0f} min "
                                           f"(process {pid} on {host})")
    # No status.json (an older run): judge by the log's age.
    if log_age is not None and log_age < LIVE_SECONDS:
        return "running", f"log.txt written {log_age:.0f} s ago"
    return _ended(resumable, ckpt_step, "")


def _ended(resumable: bool, ckpt_step: int | None, why: str) -> tuple[str, str]:
    """A run that is not running and did not finish: stopped if it can resume."""
    if resumable:
        return "stopped", "; ".join(x for x in (why, f"resumable from step {ckpt_step}") if x)
    return "failed", "; ".join(x for x in (why, "no checkpoint to resume from") if x)
