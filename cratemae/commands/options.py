"""Options shared by several commands, defined once as `Annotated` aliases.

A command declares `recipe: RecipeArg` or `set_: SetOpt = None` and gets the same flag
name, metavar and help text as every other command. Checks that Typer cannot express
(a file that must exist, `--resume auto|PATH|never`) are small functions here that raise
`BadInputError`, so their messages look like every other input error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from cratemae.errors import BadInputError

__all__ = [
    "CheckpointArg",
    "CheckpointOpt",
    "JsonOpt",
    "OutOpt",
    "RecipeArg",
    "ResumeOpt",
    "SetOpt",
    "parse_resume",
    "require_file",
]

RecipeArg = Annotated[
    Path,
    typer.Argument(metavar="RECIPE", help="Recipe file (TOML).", show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. optim.lr=1e-4 (repeatable; value parsed as TOML).",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        metavar="DIR",
        help="Output directory (default: the recipe's run.out_dir).",
        show_default=False,
    ),
]
ResumeOpt = Annotated[
    str,
    typer.Option(
        "--resume",
        metavar="auto|PATH|never",
        help="auto: continue from the newest checkpoint in the output directory if there is "
        "one; PATH: continue from that checkpoint; never: start fresh.",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print the result as one JSON object on stdout (logs: stderr)."),
]
CheckpointOpt = Annotated[
    Path,
    typer.Option(
        "--checkpoint",
        metavar="CKPT",
        help="Checkpoint directory, run directory (its latest) or weights file.",
        show_default=False,
    ),
]
CheckpointArg = Annotated[
    Path,
    typer.Argument(
        metavar="CKPT",
        help="Checkpoint directory, run directory (its latest) or weights file.",
        show_default=False,
    ),
]


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is an existing file, else raise `BadInputError` naming it."""
    if not path.is_file():
        raise BadInputError(f"{path}: {what} not found")
    return path


def parse_resume(value: str) -> Literal["auto", "never"] | Path:
    """`--resume`: the word `auto` or `never`, or the path of an existing checkpoint (or run)
    directory; the engine checks that it holds a complete checkpoint."""
    if value == "auto":
        return "auto"
    if value == "never":
        return "never"
    path = Path(value)
    if not path.exists():
        raise BadInputError(
            f"--resume {value}: no such checkpoint (expected auto, never or a path)"
        )
    return path
