"""`cratemae probe`: linear-probe a pre-trained encoder."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cratemae.commands import console
from cratemae.commands.options import CheckpointOpt, JsonOpt, OutOpt, RecipeArg, SetOpt
from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe

__all__ = ["probe", "require_checkpoint"]


def probe(
    recipe: RecipeArg,
    checkpoint: CheckpointOpt,
    set_: SetOpt = None,
    out: OutOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Linear-probe a pre-trained encoder.

    The encoder is frozen. probe.protocol "features" (the authors'): cached features of the
    centre-cropped image + logistic regression over a weight-decay grid chosen on a held-out
    part of data.train; "mae" (MAE's): BatchNorm + linear head trained with LARS. Writes
    probe.json (top1/top5 on data.val) and prints a table.

    Examples:
      $ cratemae probe recipes/probe/demo.toml --checkpoint runs/demo
      $ cratemae probe recipes/probe/cifar10.toml --checkpoint runs/base --set probe.pool=avg
      $ cratemae probe recipes/probe/pets.toml --checkpoint runs/base --out runs/lin-pets --json
      $ torchrun --nproc-per-node 8 -m cratemae probe recipes/probe/in1k.toml --checkpoint runs/base
    """
    r = load_recipe(recipe, set_ or [])
    require_checkpoint(checkpoint)
    from cratemae.engine.probe import probe as run_probe  # torch loads lazily

    with console_progress("probe") as (on_progress, on_log):
        result = run_probe(r, checkpoint, out_dir=out, on_progress=on_progress, on_log=on_log)
    if not result.main_process:
        return
    s = result.summary
    if json_:
        print(json.dumps({k: v for k, v in s.items() if k != "recipe"} | {
            "out_dir": str(result.out_dir)}))
        return
    rows = [("protocol", s["protocol"]), ("checkpoint", s["checkpoint"]),
            ("feature", f"{s['pool']} of layer {s['layer']}, {s['img_size']} px"),
            ("classes", str(s["num_classes"]))]
    if "weight_decay" in s:
        rows.append(("weight decay", f"{s['weight_decay']:g} (held-out top-1 "
                                     f"{max(g['holdout_top1'] for g in s['grid']):.2f}%)"))
    rows += [("top-1", f"{s['top1']:.2f}%"), ("top-5", f"{s['top5']:.2f}%"),
             ("written", str(result.out_dir / "probe.json"))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def require_checkpoint(path: Path) -> Path:
    """A checkpoint is a directory (checkpoint or run) or a weights file: it must exist."""
    if not path.exists():
        raise BadInputError(f"{path}: checkpoint not found")
    return path


@contextmanager
def console_progress(name: str) -> Iterator[tuple[Any, Any]]:
    """Library log lines to the console, and progress: a bar per stage on a terminal
    (feature extraction, training steps), plain log lines otherwise."""
    logger = logging.getLogger("cratemae")
    interactive = console.is_interactive()
    handler = console.LogHandler(hide_metrics=interactive)
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
                bar("train", record.get("total_steps")).set(
                    record["step"], record.get("total_steps"), f"loss {record['loss']:.4f}")

            yield on_progress, on_log
    finally:
        logger.removeHandler(handler)
