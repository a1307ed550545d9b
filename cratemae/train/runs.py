"""Reading run directories back for `cratemae runs`: what each run is, how far it got, its
last figures, and whether it is running, finished, stopped (resumable) or failed. Runs are
written by `cratemae.train.run_dir` and `RunSetup`; the names are `cratemae.rundir`'s.

A listing never stops at one bad run: a run whose status.json, metrics.jsonl or recipe.toml
is damaged (a torn write, a hand edit, a FIFO where a file should be) or whose folder cannot
be read is listed as `unreadable`, with the reason. Nothing here opens a FIFO, socket or
device (`cratemae.guard.special_kind`), and metrics.jsonl is read from its end, a window at
a time, only as far back as the table needs.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cratemae.checkpoints.discover import find_run_dirs, os_reason
from cratemae.checkpoints.resolve import complete_checkpoints
from cratemae.errors import BadInputError
from cratemae.fs import pid_alive
from cratemae.guard import special_kind
from cratemae.rundir import RunFiles
from cratemae.train.lock import lock_holder

__all__ = [
    "LIVE_SECONDS",
    "METRICS_WINDOW",
    "STATES",
    "RunInfo",
    "UnreadableRun",
    "describe_run",
    "list_runs",
    "tail_metrics",
]

# A run whose log.txt changed this recently counts as running when its process cannot be
# checked (another host): a live run logs every `run.log_every` steps.
LIVE_SECONDS = 600
# metrics.jsonl is read backwards this many bytes at a time, at most METRICS_MAX_WINDOWS
# times: the table needs the last training line and the last evaluation, not the history.
METRICS_WINDOW = 1 << 20
METRICS_MAX_WINDOWS = 8
# status.json, recipe.toml, probe.json, finetune.json are small: a bigger one is damage.
SMALL_FILE_LIMIT = 1 << 20
# Process ids `os.kill` takes (0 and negative ones would signal process groups).
_MAX_PID = 2**31 - 1
STATES = ("running", "finished", "stopped", "failed", "unreadable")
_NUMBERS = ("step", "total_steps", "loss", "val_loss", "val_knn_top1", "top1", "recovery")


class UnreadableRun(Exception):
    """A run file that cannot be read or makes no sense; the message says which and why."""


@dataclass
class RunInfo:
    """What `cratemae runs` shows of one run directory."""

    path: str
    kind: str  # "pre-train", "fine-tune", "probe", or "unknown" when unreadable
    model: str | None
    step: int | None
    total_steps: int | None
    loss: float | None  # the last training line's
    val_loss: float | None
    val_knn_top1: float | None
    top1: float | None  # fine-tuning's and probing's last evaluation
    state: str  # one of STATES
    detail: str  # why: the process, the error, the age of the log, what is unreadable
    last_checkpoint: str | None
    recoveries: int = 0  # rollbacks after non-finite losses (`"kind": "recovery"` lines)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def unreadable(path: Path, reason: str) -> RunInfo:
    """The row of a run that cannot be read: state "unreadable", the reason as detail."""
    return RunInfo(str(path), "unknown", None, None, None, None, None, None, None,
                   "unreadable", reason, None)


def list_runs(root: Path, now: float | None = None) -> list[RunInfo]:
    """Every run under `root` (or `root` itself), once each however many links lead to it;
    a damaged or unreadable one as `unreadable`, never an exception."""
    rows = []
    for path, problem in find_run_dirs(root):
        if problem is not None:
            rows.append(unreadable(path, problem))
            continue
        try:
            rows.append(describe_run(path, now))
        except (UnreadableRun, BadInputError) as err:
            rows.append(unreadable(path, str(err)))
        except OSError as err:
            rows.append(unreadable(path, os_reason(err)))
    return rows


def describe_run(run_dir: Path, now: float | None = None) -> RunInfo:
    """Read a run directory back: its kind, progress, last figures and state. Raises
    `UnreadableRun` when one of its files is damaged."""
    files = RunFiles(run_dir)
    now = time.time() if now is None else now
    kind, model = _kind_and_model(run_dir)
    records = tail_metrics(files.metrics)
    train = [r for r in records if r.get("kind", "train") == "train" and "loss" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    try:
        found = complete_checkpoints(files.checkpoints) if files.checkpoints.is_dir() else []
    except BadInputError:  # a checkpoint edited into nonsense: the run reads as stopped there
        found = []
    last_ckpt, meta = found[-1] if found else (None, {})
    ckpt_step = _whole(meta.get("step", 0), "checkpoint step") if found else None
    last = train[-1] if train else {}
    total = last.get("total_steps")
    step = max((s for s in (last.get("step"), ckpt_step) if s is not None), default=None)
    val = next((r for r in reversed(evals) if "val_loss" in r), {})
    scored = next((r for r in reversed(evals) if "top1" in r), {})
    top1 = scored.get("top1")
    if kind == "probe":
        top1 = _number(_read_json(files.probe).get("top1", top1), f"{files.probe.name}: top1")
    rolled = [r["recovery"] for r in records if r.get("kind") == "recovery" and "recovery" in r]
    recoveries = int(max([*rolled[-1:], _whole(meta.get("recoveries", 0), "recoveries")]))
    state, detail = _state(run_dir, kind, step, total, ckpt_step, now)
    return RunInfo(str(run_dir), kind, model, step, total, last.get("loss"),
                   val.get("val_loss"), val.get("val_knn_top1"), top1, state, detail,
                   str(last_ckpt) if last_ckpt is not None else None, recoveries)


def _open_regular(path: Path) -> int | None:
    """A descriptor of `path` if it is a regular file; None if it is absent. A FIFO, socket,
    device or folder is `UnreadableRun`, and is never opened."""
    kind = special_kind(path)
    if kind is not None:
        raise UnreadableRun(f"{path.name}: is {kind}, not a file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # NONBLOCK: a FIFO swapped in since
    except FileNotFoundError:
        return None
    except OSError as err:
        raise UnreadableRun(f"{path.name}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnreadableRun(f"{path.name}: not a regular file")
    return fd


def _read_text(path: Path) -> str | None:
    """A small run file's text (None if absent); damage is `UnreadableRun`."""
    fd = _open_regular(path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(SMALL_FILE_LIMIT + 1)
    if len(data) > SMALL_FILE_LIMIT:
        raise UnreadableRun(f"{path.name}: over {SMALL_FILE_LIMIT} bytes")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UnreadableRun(f"{path.name}: not text (a torn write?)") from None


def _read_json(path: Path) -> dict[str, Any]:
    """A run's JSON record ({} when absent); anything but one JSON object is damage."""
    text = _read_text(path)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise UnreadableRun(f"{path.name}: not JSON (a torn write?)") from None
    if not isinstance(data, dict):
        raise UnreadableRun(f"{path.name}: not a JSON object")
    return data


def _number(value: Any, what: str) -> Any:
    """`value` if it is a number or None; anything else is damage."""
    if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value
    raise UnreadableRun(f"{what}: not a number ({str(value)[:40]!r})")


def _whole(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise UnreadableRun(f"{what}: not a whole number >= 0 ({str(value)[:40]!r})")


def tail_metrics(path: Path) -> list[dict[str, Any]]:
    """The last lines of a metrics.jsonl (none if absent), oldest first: read backwards a
    window at a time until a training line and an evaluation are in hand (or the start, or
    METRICS_MAX_WINDOWS windows). The very last line may be cut short by a crash and is
    skipped; any other line that is not a JSON object with numbers where numbers go is
    `UnreadableRun`."""
    fd = _open_regular(path)
    if fd is None:
        return []
    with os.fdopen(fd, "rb") as f:
        end = start = f.seek(0, os.SEEK_END)
        data = b""
        for _ in range(METRICS_MAX_WINDOWS):
            start = max(0, start - METRICS_WINDOW)
            f.seek(start)
            data = f.read(end - start)
            lines = data.split(b"\n")
            records = _parse_lines(lines if start == 0 else lines[1:], path.name)
            kinds = {r.get("kind", "train") for r in records}
            if start == 0 or {"train", "eval"} <= kinds:
                return records
    return records


def _parse_lines(lines: list[bytes], name: str) -> list[dict[str, Any]]:
    records = []
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise UnreadableRun(f"{name}: a line is not text (a torn write?)") from None
        except (ValueError, RecursionError):
            if i == last:  # the line being written when the run died
                continue
            raise UnreadableRun(f"{name}: a line is not JSON (a torn write?)") from None
        if not isinstance(record, dict):
            raise UnreadableRun(f"{name}: a line is not a JSON object")
        for key in _NUMBERS:
            _number(record.get(key), f"{name}: {key}")
        for key in ("step", "total_steps"):
            if key in record:
                _whole(record[key], f"{name}: {key}")
        records.append(record)
    return records


def _kind_and_model(run_dir: Path) -> tuple[str, str | None]:
    """Pre-training names its model in the recipe; fine-tuning and probing take theirs
    from a checkpoint, which their log's first line names."""
    files, head = RunFiles(run_dir), ""
    fd = _open_regular(files.log)
    if fd is not None:
        with open(fd, encoding="utf-8", errors="replace") as f:
            head = f.read(20000)
    for kind, marker, done in (("fine-tune", " fine-tuning ", files.finetune),
                               ("probe", " probing ", files.probe)):
        record = _read_json(done)
        if marker in head or record:
            source = record.get("checkpoint")
            if source is None and marker in head:
                source = head.split(marker, 1)[1].split(" ", 1)[0]
            return kind, f"encoder of {source}" if source else None
    text = _read_text(files.recipe)
    try:
        recipe = tomllib.loads(text or "")
    except (ValueError, RecursionError):
        raise UnreadableRun(f"{files.recipe.name}: not TOML") from None
    model = recipe.get("model", {})
    name = model.get("name", "crate_mae_base") if isinstance(model, dict) else None
    if not isinstance(name, str):
        raise UnreadableRun(f"{files.recipe.name}: model is not a section with a name")
    return "pre-train", name


def _status(files: RunFiles) -> dict[str, Any]:
    """status.json, checked: a known state, a host name, a process id `os.kill` may take."""
    status = _read_json(files.status)
    if not status:
        return {}
    where = files.status.name
    if status.get("state") not in ("running", "finished", "stopped", "failed"):
        raise UnreadableRun(f"{where}: state {str(status.get('state'))[:40]!r} is unknown")
    if status["state"] == "running":
        pid, host = status.get("pid"), status.get("host")
        if not (isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= _MAX_PID):
            raise UnreadableRun(f"{where}: pid {str(pid)[:40]!r} is not a process id")
        if not isinstance(host, str):
            raise UnreadableRun(f"{where}: host {str(host)[:40]!r} is not a host name")
    return status


def _state(run_dir: Path, kind: str, step: int | None, total: int | None,
           ckpt_step: int | None, now: float) -> tuple[str, str]:
    holder = lock_holder(run_dir)  # the lock is the authority: held only by a live process
    if holder is not None:
        return "running", f"lock held by {holder}"
    files = RunFiles(run_dir)
    status = _status(files)
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
        host, pid = status["host"], status["pid"]
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
