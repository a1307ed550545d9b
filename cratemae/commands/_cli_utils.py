"""What commands share: options defined once as `Annotated` aliases, input checks, and the
console set-up of a command that runs the library (log lines, progress, one line per rank).

A command declares `recipe: RecipeArg` or `set_: SetOpt = None` and gets the same flag
name, metavar and help text as every other command. Checks that Typer cannot express
(a file that must exist, `--resume auto|PATH|never`) are small functions here that raise
`BadInputError`, so their messages look like every other input error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from cratemae.commands import console
from cratemae.errors import BadInputError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "CheckpointArg",
    "CheckpointOpt",
    "DryRunOpt",
    "GpuMemoryOpt",
    "ImagesPerSecondOpt",
    "JsonOpt",
    "OutOpt",
    "RecipeArg",
    "ResumeOpt",
    "SetOpt",
    "WorldSizeOpt",
    "command_console",
    "plain_help_types",
    "preemptible",
    "require_checkpoint",
    "require_file",
    "show_plan",
]

RecipeArg = Annotated[
    Path,
    typer.Argument(
        metavar="RECIPE",
        help="Recipe file (TOML), or the name of a shipped recipe ('cratemae recipes' lists "
        "them); an existing file wins.",
        show_default=False,
    ),
]  # `load_recipe` resolves it: cratemae.recipe.shipped
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a recipe value, e.g. optim.lr=1e-4 or 'probe.pool=\"avg\"' "
        "(repeatable; the value is TOML, so a string needs quotes).",
        show_default=False,
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        metavar="DIR",
        help="Output directory (default: the recipe's run.out_dir; for probe and finetune, "
        "when the recipe sets none, named after the checkpoint's run: runs/demo-probe).",
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

DryRunOpt = Annotated[
    bool,
    typer.Option("--dry-run", help="Check and plan the run without starting it: data, model, "
                 "memory, schedule, run directory and time; no accelerator used, nothing "
                 "written. Exit 0 when it would start, 2 with every reason when not."),
]
GpuMemoryOpt = Annotated[
    float | None,
    typer.Option("--gpu-memory", metavar="GIB", show_default=False,
                 help="With --dry-run: the memory of one GPU, to say the largest batch that "
                 "fits (and refuse a recipe whose batch does not)."),
]
ImagesPerSecondOpt = Annotated[
    float | None,
    typer.Option("--images-per-second", metavar="N", show_default=False,
                 help="With --dry-run: one rank's training speed (`cratemae bench`), for the "
                 "wall time per epoch and for the run."),
]
WorldSizeOpt = Annotated[
    int | None,
    typer.Option("--world-size", metavar="N", min=1, show_default=False,
                 help="With --dry-run: plan for N ranks (default: the launch's, else 1)."),
]


# Typer's help writes Python's names in the type column (`<bool>` on every flag,
# `<list[Path]>`, `<int>`); users read these words instead.
_TYPE_WORDS = {"Path": "PATH", "str": "TEXT", "int": "INTEGER", "float": "NUMBER"}


def _help_type(label: str | None) -> str | None:
    """`<list[Path]>` -> `PATH...`, `<int>` -> `INTEGER`, `<a|b>` -> `a|b`."""
    if label is None:
        return None
    inner = label[1:-1] if label.startswith("<") and label.endswith(">") else label
    many = inner.startswith("list[") and inner.endswith("]")
    inner = inner[5:-1] if many else inner
    word = _TYPE_WORDS.get(inner, inner)
    return f"{word}..." if many else word


def plain_help_types() -> None:
    """Make every command's `--help` show no type for flags, the metavar where one is given
    (an argument's already names it), and plain words for the rest. Idempotent."""
    from typer.core import TyperArgument, TyperOption

    if getattr(TyperOption, "_cratemae_plain", False):
        return
    option_type, argument_type = TyperOption.display_type_rich, TyperArgument.display_type_rich

    def option(self: Any, ctx: Any) -> str | None:
        if self.is_flag:
            return None
        if self.metavar is not None:
            return self.metavar
        return _help_type(option_type(self, ctx))

    def argument(self: Any, ctx: Any) -> str | None:
        return None if self.metavar is not None else _help_type(argument_type(self, ctx))

    TyperOption.display_type_rich = option  # type: ignore[method-assign]
    TyperArgument.display_type_rich = argument  # type: ignore[method-assign]
    TyperOption._cratemae_plain = True  # type: ignore[attr-defined]


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is an existing file, else raise `BadInputError` naming it."""
    if not path.is_file():
        raise BadInputError(f"{path}: {what} not found")
    return path


def preemptible(func: F) -> F:
    """Listen for SIGTERM/SIGUSR1 from the command's first line, before torch is imported:
    a stop sent to the job while it starts is remembered, and the run's first step boundary
    saves and exits 3 (`cratemae.distributed.preemption`), instead of the process dying
    with nothing said."""

    @functools.wraps(func)  # keeps the signature and docstring that Typer reads
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cratemae.distributed.preemption import PreemptionFlag  # standard library only

        with PreemptionFlag():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_checkpoint(path: Path) -> Path:
    """A checkpoint is a directory (checkpoint or run) or a weights file: it must exist."""
    if not path.exists():
        raise BadInputError(f"{path}: checkpoint not found")
    return path


StageProgress = Callable[[str, int, int], None]  # (what, done, total)
LogCallback = Callable[[dict[str, Any]], None]  # one metrics record


@contextmanager
def command_console(name: str) -> Iterator[tuple[StageProgress, LogCallback]]:
    """Library log lines to the console while a command runs, and its progress: a bar per
    stage on a terminal (feature extraction, training steps), plain log lines otherwise.
    Ranks other than 0 show only warnings and errors, so a launch prints each line once.

    Yields `(on_progress, on_log)` for the library's callbacks."""
    logger = logging.getLogger("cratemae")
    from cratemae.distributed.dist import is_main_process  # torch loads lazily

    main = is_main_process()
    interactive = main and console.is_interactive()
    handler = console.LogHandler(hide_metrics=interactive)
    if not main:
        handler.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if not interactive:
            yield (lambda what, done, total: None), (lambda record: None)
            return
        with ExitStack() as stack:
            bars: dict[str, console.Tracker] = {}

            def bar(what: str, total: int | None) -> console.Tracker:
                if what not in bars:
                    bars[what] = stack.enter_context(console.progress(total, f"{name}: {what}"))
                return bars[what]

            def on_progress(what: str, done: int, total: int) -> None:
                bar(what, total).set(done, total)

            def on_log(record: dict[str, Any]) -> None:
                info = f"loss {record['loss']:.4f}"
                if "images_per_s" in record:
                    info += f" {record['images_per_s']:.0f} img/s"
                bar("train", record.get("total_steps")).set(
                    record["step"], record.get("total_steps"), info)

            yield on_progress, on_log
    finally:
        logger.removeHandler(handler)


def launch_rank_world(world_size: int | None) -> tuple[int, int]:
    """(rank, world size) of the launch this process is part of, without joining it;
    `world_size` (--world-size) plans for another (as rank 0)."""
    import os

    from cratemae.distributed.dist import parse_launch_env

    launch = parse_launch_env(os.environ)
    if world_size is not None and world_size != launch.world_size:
        return 0, world_size
    return launch.rank, launch.world_size


def check_plan_figures(gpu_memory: float | None, images_per_second: float | None) -> None:
    """--gpu-memory and --images-per-second in range (finite: above 0 and at most 1e6 GiB;
    from 0.001 to 1e9 images/s), else one `error:` line before anything is planned."""
    if gpu_memory is not None and not 0 < gpu_memory <= 1e6:  # nan fails both comparisons
        raise BadInputError(f"--gpu-memory {gpu_memory:g}: must be a number above 0, at most "
                            "1e+06 (GiB)")
    if images_per_second is not None and not 1e-3 <= images_per_second <= 1e9:
        raise BadInputError(f"--images-per-second {images_per_second:g}: must be a number from "
                            "0.001 to 1e+09")


def measured_rates() -> Any:
    """The dry run's `Rates`: the figures `cratemae bench` and `cratemae bench-data` recorded
    on this machine (`cratemae.bench.data`), looked up as the plan asks for them."""
    from cratemae.bench.data import data_key, model_key, recorded_rate
    from cratemae.train.plan_time import Rates

    return Rates(model=lambda name, size: recorded_rate(model_key(name, size)),
                 data=lambda data, size, task: recorded_rate(data_key(data, size, task)))


def show_plan(plan: Any, *, json_: bool) -> None:
    """Print `plan` (a `cratemae.train.plan.Plan`; the GFLOP row added here, by the bench's
    count) as a table or one JSON object, on rank 0; exit 2 with every reason when the run
    would not start (each rank checks its own share)."""
    from cratemae.errors import EXIT_BAD_INPUT
    from cratemae.fs import strict_json

    if plan.model_config is not None:
        gflop = _gflop(plan.model_config, plan.mask_ratio, plan.encoder_only)
        plan.add("Model", "gflop_per_image", gflop,
                 f"{gflop:,.3g} GFLOP per image forward ({'the encoder, ' * plan.encoder_only}"
                 "matrix products, as `cratemae bench` counts)")
    from cratemae.distributed.dist import is_main_process

    if plan.rank == 0 and is_main_process():
        if json_:
            print(strict_json(plan.as_dict()))
        else:
            _print_plan(plan)
    if not plan.ok:
        console.error("\n".join(f"{r} (rank {plan.rank})" if plan.world > 1 else r
                                 for r in plan.reasons))
        raise typer.Exit(EXIT_BAD_INPUT)


def _gflop(config: Any, mask_ratio: float, encoder_only: bool) -> float:
    """The bench's forward count (`forward_flops`); of the encoder alone on the whole
    image for a classifier: the count is linear in the decoder's depth, so its value at
    depth 0 is taken from depths 1 and 2."""
    import dataclasses

    from cratemae.bench.speed import forward_flops

    if not encoder_only:
        return forward_flops(config, mask_ratio=mask_ratio) / 1e9
    one, two = (forward_flops(dataclasses.replace(config, decoder_depth=d), mask_ratio=0.0)
                for d in (1, 2))
    return (2 * one - two) / 1e9


def _print_plan(plan: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"cratemae {plan.command} --dry-run", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_column(overflow="fold")
    for title, rows in plan.sections.items():
        for i, (key, _, text) in enumerate(rows):
            table.add_row(title if i == 0 else "", key.replace("_", " "), text)
        table.add_section()
    verdict = "the run would start" if plan.ok else (
        f"the run would not start: {len(plan.reasons)} reason(s) below")
    Console(highlight=False, soft_wrap=False).print(table, verdict)
