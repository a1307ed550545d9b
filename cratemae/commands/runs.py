"""`cratemae runs`: the runs under a folder, what they are and where each stands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cratemae.commands._cli_utils import JsonOpt
from cratemae.errors import BadInputError
from cratemae.fs import strict_json

__all__ = ["runs"]


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def runs(
    folder: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="A folder of run directories, or one run."),
    ] = Path("runs"),
    json_: JsonOpt = False,
) -> None:
    """List the runs under a folder: kind, model, progress, last figures, state.

    A run directory is one with a recipe.toml. State: running (the process, or a log
    line in the last 10 minutes when it runs on another host), finished, stopped (resumable
    from its last checkpoint) or failed (with the error).

    Examples:
      $ cratemae runs runs/
      $ cratemae runs /scratch/me/runs --json
    """
    from cratemae.checkpoints.resolve import find_runs  # torch loads lazily
    from cratemae.train.runs import describe_run

    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such folder")
    infos = [describe_run(d) for d in find_runs(folder)]
    if json_:
        print(strict_json([i.to_json() for i in infos]))
        return
    if not infos:
        print(f"no runs under {folder} (a run directory holds a recipe.toml)")
        return
    header = ("run", "kind", "model", "step", "loss", "val_loss", "knn top-1", "top-1",
              "state", "last checkpoint")
    rows = [header] + [(
        str(Path(i.path).relative_to(folder)) if Path(i.path) != folder else str(folder),
        i.kind, i.model or "-",
        f"{_num(i.step, 'd')}/{_num(i.total_steps, 'd')}",
        _num(i.loss, ".4f"), _num(i.val_loss, ".4f"), _num(i.val_knn_top1, ".1f"),
        _num(i.top1, ".2f"), i.state + (f" ({i.detail})" if i.detail else ""),
        Path(i.last_checkpoint).name if i.last_checkpoint else "-",
    ) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
