"""Reading run directories back for `cratemae runs`: what each run is, how far it got, its
last figures, and whether it is running, finished, stopped (resumable) or failed. Runs are
written by `cratemae.train.run_dir` and `RunSetup`; the names are `cratemae.rundir`'s."""

from __future__ import annotations

import json
import socket
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cratemae.checkpoints.resolve import complete_checkpoints
from cratemae.errors import BadInputError
from cratemae.fs import pid_alive
from cratemae.rundir import RunFiles
from cratemae.train.lock import lock_holder

__all__ = ["LIVE_SECONDS", "RunInfo", "describe_run", "read_metrics"]

# A run whose log.txt changed this recently counts as running when its process cannot be
# checked (another host): a live run logs every `run.log_every` steps.
LIVE_SECONDS = 600


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
    recoveries: int = 0  # rollbacks after non-finite losses (`"kind": "recovery"` lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def describe_run(run_dir: Path, now: float | None = None) -> RunInfo:
    """Read a run directory back: its kind, progress, last figures and state."""
    files = RunFiles(run_dir)
    now = time.time() if now is None else now
    kind, model = _kind_and_model(run_dir)
    records = read_metrics(files.metrics)
    train = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    try:
        found = complete_checkpoints(files.checkpoints) if files.checkpoints.is_dir() else []
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
    if kind == "probe" and files.probe.is_file():
        top1 = _read_json(files.probe).get("top1", top1)
    state, detail = _state(run_dir, kind, step, total, ckpt_step, now)
    return RunInfo(str(run_dir), kind, model, step, total, last.get("loss"),
                   val.get("val_loss"), val.get("val_knn_top1"), top1, state, detail,
                   str(last_ckpt) if last_ckpt is not None else None,
                   sum(r.get("kind") == "recovery" for r in records))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kind_and_model(run_dir: Path) -> tuple[str, str | None]:
    """Pre-training names its model in the recipe; fine-tuning and probing take theirs
    from a checkpoint, which their log's first line names."""
    files, head = RunFiles(run_dir), ""
    if files.log.is_file():
        with open(files.log, encoding="utf-8", errors="replace") as f:
            head = f.read(20000)
    for kind, marker, done in (("fine-tune", " fine-tuning ", files.finetune),
                               ("probe", " probing ", files.probe)):
        if marker in head or done.is_file():
            source = _read_json(done).get("checkpoint")
            if source is None and marker in head:
                source = head.split(marker, 1)[1].split(" ", 1)[0]
            return kind, f"encoder of {source}" if source else None
    try:
        recipe = tomllib.loads(files.recipe.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "pre-train", None
    return "pre-train", recipe.get("model", {}).get("name", "crate_mae_base")


def _state(run_dir: Path, kind: str, step: int | None, total: int | None,
           ckpt_step: int | None, now: float) -> tuple[str, str]:
    holder = lock_holder(run_dir)  # the lock is the authority: held only by a live process
    if holder is not None:
        return "running", f"lock held by {holder}"
    files = RunFiles(run_dir)
    status = _read_json(files.status)
    done_file = {"fine-tune": files.finetune, "probe": files.probe}.get(kind)
    log_age = now - files.log.stat().st_mtime if files.log.is_file() else None
    resumable = ckpt_step is not None
    if status.get("state") == "failed":
        return "failed", str(status.get("error", ""))
    if status.get("state") == "stopped":
        return "stopped", f"resumable from step {ckpt_step}" if resumable else "no checkpoint"
    finished = (done_file is not None and done_file.is_file()) or (
        kind == "pre-train" and total is not None and ckpt_step == total)
    if status.get("state") == "finished" or (finished and status.get("state") != "running"):
        return "finished", ""
    if status.get("state") == "running":
        host, pid = status.get("host"), int(status.get("pid", 0))
        if host == socket.gethostname():
            if pid_alive(pid):
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
