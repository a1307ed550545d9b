"""Terminal output for commands: log lines, progress, and the one place errors are formatted.

On an interactive terminal output is styled with rich; otherwise (a cluster log file, a pipe,
CI) it is plain, timestamped lines that read well in `tail -f` and `grep`. Everything here
writes to stderr by default, so a command's `--json` result on stdout stays clean.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = [
    "LogHandler", "Tracker", "as_invoked", "error", "is_interactive", "log", "progress", "warn",
]

_FALSE = ("", "0", "false", "no", "off")


def is_interactive(stream: TextIO | None = None) -> bool:
    """True when `stream` (default: stdout) is a terminal and not CI or `TERM=dumb`."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("CI", "").strip().lower() not in _FALSE:
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _err() -> TextIO:
    return sys.stderr  # looked up on each call: tests and rich's Live swap it


def _console(stream: TextIO) -> Console:
    return Console(file=stream, highlight=False, soft_wrap=True)


def _stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def log(message: str, *, style: str | None = None, stream: TextIO | None = None) -> None:
    """One log line: `YYYY-mm-dd HH:MM:SS message` in a file, a styled line on a terminal."""
    stream = _err() if stream is None else stream
    if is_interactive(stream):
        line = Text.assemble((time.strftime("%H:%M:%S"), "dim"), " ", (message, style or ""))
        _console(stream).print(line)
    else:
        print(f"{_stamp()} {message}", file=stream, flush=True)


def _prefixed(prefix: str, style: str, message: str) -> None:
    stream = _err()
    lines = message.splitlines() or [""]
    if is_interactive(stream):
        console = _console(stream)
        for line in lines:
            console.print(Text.assemble((prefix, style), " ", line))
    else:
        for line in lines:
            print(f"{prefix} {line}", file=stream)
        stream.flush()


def as_invoked(text: str, argv0: str | None = None) -> str:
    """Next-step lines (`  cratemae probe ...`, `  tensorboard ...`) as the user can run them
    where they are: when cratemae was called by a path that is not what PATH finds (right
    after the README's set-up, `.venv/bin/cratemae`), the commands are called by that path
    and the tensorboard beside it."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) != "cratemae" or os.sep not in argv0:
        return text
    found = shutil.which("cratemae")
    if found is not None and os.path.realpath(found) == os.path.realpath(argv0):
        return text
    names = {"cratemae": argv0}
    board = os.path.join(os.path.dirname(argv0), "tensorboard")
    if os.path.isfile(board):
        names["tensorboard"] = board
    out = []
    for line in text.split("\n"):
        body = line.lstrip(" ")
        word = body.split(" ", 1)[0]
        if word in names:
            line = line[: len(line) - len(body)] + shlex.quote(names[word]) + body[len(word):]
        out.append(line)
    return "\n".join(out)


def error(message: str) -> None:
    """Print `error: <line>` to stderr for each line of `message`."""
    _prefixed("error:", "bold red", message)


def warn(message: str) -> None:
    """Print `warning: <line>` to stderr for each line of `message`."""
    _prefixed("warning:", "bold yellow", message)


class LogHandler(logging.Handler):
    """Routes the library's `logging` lines (logger `cratemae`) to the console.

    With `hide_metrics`, records logged with `extra={"metrics": True}` (the per-step lines
    that a progress bar already shows) are left to the run's log file.
    """

    def __init__(self, hide_metrics: bool = False) -> None:
        super().__init__(logging.INFO)
        self.hide_metrics = hide_metrics

    def emit(self, record: logging.LogRecord) -> None:
        if self.hide_metrics and getattr(record, "metrics", False):
            return
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            error(message)
        elif record.levelno >= logging.WARNING:
            warn(message)
        else:
            log(message)


class Tracker:
    """What `progress()` yields: call `advance()` as work completes."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.completed = 0
        self.info = ""

    def advance(self, n: int = 1, info: str | None = None) -> None:
        """Count `n` more units done; `info` (e.g. `loss 0.412`) is shown after the count."""
        self.completed += n
        if info is not None:
            self.info = info
        self._update()

    def set(self, completed: int, total: int | None = None, info: str | None = None) -> None:
        """Jump to `completed` units (and a new `total`, when it becomes known)."""
        self.completed = completed
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        self._update()

    def _update(self) -> None:
        """Show the new state; each display overrides this."""


class _RichTracker(Tracker):
    def __init__(self, total: int | None, bar: Progress, task: TaskID) -> None:
        super().__init__(total)
        self._bar, self._task = bar, task

    def _update(self) -> None:
        self._bar.update(self._task, completed=self.completed, total=self.total, info=self.info)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _PlainTracker(Tracker):
    """Prints a line each time another `every_percent` is done, or `every_seconds` passed."""

    def __init__(
        self,
        total: int | None,
        description: str,
        stream: TextIO,
        every_percent: float,
        every_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(total)
        self._description, self._stream, self._clock = description, stream, clock
        self._every_percent, self._every_seconds = every_percent, every_seconds
        self._start = self._last_time = clock()
        self._last_step = 0

    def _step(self) -> int:
        if not self.total:
            return 0
        return int(100 * self.completed / self.total // self._every_percent)

    def _update(self) -> None:
        if self.total and self.completed >= self.total:
            return  # the closing line reports the end
        now, step = self._clock(), self._step()
        if step > self._last_step or now - self._last_time >= self._every_seconds:
            self._last_step, self._last_time = step, now
            self._emit(now)

    def _emit(self, now: float, end: str = "") -> None:
        elapsed = now - self._start
        parts = [f"{self._description}:"]
        if self.total:
            parts.append(
                f"{self.completed}/{self.total} ({100 * self.completed / self.total:.0f}%)"
            )
        else:
            parts.append(str(self.completed))
        parts.append(f"elapsed {_hms(elapsed)}")
        if end:
            parts.append(end)
        elif self.total and 0 < self.completed < self.total:
            parts.append(f"eta {_hms(elapsed * (self.total - self.completed) / self.completed)}")
        if self.info:
            parts.append(self.info)
        log(" ".join(parts), stream=self._stream)

    def close(self, end: str) -> None:
        self._emit(self._clock(), end)


@contextmanager
def progress(
    total: int | None,
    description: str,
    *,
    stream: TextIO | None = None,
    every_percent: float = 10.0,
    every_seconds: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Tracker]:
    """A rich progress bar on a terminal; otherwise plain lines every N% or every few seconds.

    `total=None` means unknown length (plain mode then prints every `every_seconds`).

        with progress(len(loader), "epoch 3") as bar:
            for batch in loader:
                ...
                bar.advance(info=f"loss {loss:.4f}")
    """
    stream = _err() if stream is None else stream
    if is_interactive(stream):
        columns = (
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
        )
        with Progress(*columns, console=_console(stream)) as bar:
            yield _RichTracker(total, bar, bar.add_task(description, total=total, info=""))
        return
    tracker = _PlainTracker(total, description, stream, every_percent, every_seconds, clock)
    try:
        yield tracker
    except BaseException:
        tracker.close("stopped")
        raise
    tracker.close("done")
