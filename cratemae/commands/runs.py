"""`cratemae runs`: the runs under a folder, what they are and where each stands."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import JsonOpt
from cratemae.errors import BadInputError
from cratemae.fs import strict_json

if TYPE_CHECKING:
    from cratemae.train.runs import RunInfo

__all__ = ["runs"]


def runs(
    folder: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="A folder of run directories, or one run."),
    ] = Path("runs"),
    json_: JsonOpt = False,
    wide: Annotated[
        bool,
        typer.Option("--wide", help="Add why each run is in its state; cut nothing short."),
    ] = False,
) -> None:
    """List the runs under a folder: kind, model, progress, last figures, state.

    A run directory is one with a recipe.toml. State: running (its process, or a log line
    in the last 10 minutes when it runs on another host), finished, stopped (resumable from
    its last checkpoint), failed, or unreadable (a damaged file or a folder that cannot be
    read: the reason is printed). --wide and --json say why each run is in its state.

    A listing that holds unreadable runs still exits 0: the listing itself worked, and
    each such run is named, with the reason, on stderr.

    Examples:
      $ cratemae runs runs/
      $ cratemae runs /scratch/me/runs --wide
      $ cratemae runs /scratch/me/runs --json
    """
    from cratemae.train.runs import list_runs  # torch loads lazily

    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such folder")
    infos = list_runs(folder)
    for info in infos:
        if info.state == "unreadable":
            console.warn(f"{info.path}: unreadable: {info.detail}")
    if json_:
        print(strict_json([i.to_json() for i in infos]))
        return
    if not infos:
        print(f"no runs under {folder} (a run directory holds a recipe.toml)")
        return
    for line in run_table(infos, folder, wide=wide, width=None if wide else _width()):
        print(line)


def _width() -> int | None:
    """The terminal's columns (COLUMNS first); None, no limit, when stdout is a pipe."""
    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _model(info: RunInfo, wide: bool) -> str:
    """The model's name; for a fine-tune or probe the checkpoint it started from, as
    `RUN/step-N` (the whole path is in --wide and --json)."""
    if info.model is None:
        return "-"
    if info.model.startswith("encoder of ") and not wide:
        return "encoder of " + "/".join(Path(info.model[len("encoder of "):]).parts[-2:])
    return info.model


def _state(info: RunInfo) -> str:
    rolled = f", rolled back {info.recoveries}x" if info.recoveries else ""
    return info.state + rolled


def _cut(text: str, width: int) -> str:
    """`text` in `width` columns: its start and end kept, an ellipsis between."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 2
    return text[:head] + "\N{HORIZONTAL ELLIPSIS}" + text[len(text) - (width - 1 - head):]


HEADER = ("run", "kind", "model", "step", "loss", "val_loss", "knn", "top-1", "state",
          "checkpoint", "why")
FLEXIBLE = (0, 2)  # run, model: cut in the middle when the table is wider than the screen
NUMERIC = (3, 4, 5, 6, 7)


def run_table(infos: list[RunInfo], folder: Path, *, wide: bool = False,
              width: int | None = None) -> list[str]:
    """The lines `cratemae runs` prints: one row per run, the state in one word (and how
    often it rolled back). The narrow view leaves out the checkpoint, the why and the
    columns no run has a figure for, and cuts run and model names to fit `width`; `wide`
    shows every column whole."""
    rows = [[
        str(Path(i.path).relative_to(folder)) if Path(i.path) != folder else str(folder),
        i.kind, _model(i, wide), f"{_num(i.step, 'd')}/{_num(i.total_steps, 'd')}",
        _num(i.loss, ".4f"), _num(i.val_loss, ".4f"), _num(i.val_knn_top1, ".1f"),
        _num(i.top1, ".2f"), _state(i),
        Path(i.last_checkpoint).name if i.last_checkpoint else "-", i.detail or "-",
    ] for i in infos]
    keep = [c for c in range(len(HEADER)) if wide or (
        c not in (9, 10) and (c not in NUMERIC[1:] or any(r[c] != "-" for r in rows)))]
    widths = {c: max(len(r[c]) for r in [list(HEADER), *rows]) for c in keep}
    over = sum(widths.values()) + 2 * (len(keep) - 1) - (width or 10**9)
    while over > 0 and max(widths[c] for c in FLEXIBLE) > 8:  # the wider gives way first
        widths[max(FLEXIBLE, key=lambda c: widths[c])] -= 1
        over -= 1
    lines = []
    for r in [list(HEADER), *rows]:
        cells = [_cut(r[c], widths[c]) for c in keep]
        lines.append("  ".join(v.rjust(widths[c]) if c in NUMERIC else v.ljust(widths[c])
                               for c, v in zip(keep, cells, strict=True)).rstrip())
    return lines
