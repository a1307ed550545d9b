"""`cratemae bench`: time complete training steps, after checking them against the reference."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import JsonOpt
from cratemae.fs import strict_json

__all__ = ["bench"]


def bench(
    model: Annotated[str, typer.Option(help="Model preset.")] = "crate_mae_base",
    img_size: Annotated[int, typer.Option(help="Image size in pixels.")] = 224,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    steps: Annotated[int, typer.Option(help="Timed steps.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (per path).")] = 5,
    precision: Annotated[
        str, typer.Option(metavar="bf16|fp16|fp32", help="Autocast precision (fp32 on CPU).")
    ] = "bf16",
    compile_: Annotated[
        bool, typer.Option("--compile", help="torch.compile the model, as run.compile does.")
    ] = False,
    visible_only: Annotated[
        bool,
        typer.Option("--visible-only", help="MAE's encoder: kept tokens only (another model)."),
    ] = False,
    device: Annotated[
        str | None,
        typer.Option(metavar="cuda|cpu", help="Default: cuda if available, else cpu.",
                     show_default=False),
    ] = None,
    reference: Annotated[
        bool,
        typer.Option("--reference", help="Also time the authors' computation; print the ratio."),
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Time complete training steps (forward, backward, AdamW) and print images per second.

    Random input, the training code path (autocast, GradScaler, AdamW). First the loss and
    gradients of every timed path are checked, on the timing batch, against the reference
    (the authors' computation, evaluated in float64); a path that fails is not timed (exit 1).
    The fast path's images/s is recorded for this model, image size and device: `cratemae
    bench-data` and the dry run use it to say how many loader workers would feed it.

    Examples:
      $ cratemae bench --model crate_mae_tiny --device cpu --batch-size 16 --reference
      $ cratemae bench --compile --precision bf16
      $ cratemae bench --compile --visible-only --json
    """
    from cratemae.bench.data import model_key, record_rate
    from cratemae.bench.speed import BenchSpec, run_bench  # torch loads lazily
    from cratemae.distributed.device import choose_device

    chosen = choose_device(device)

    spec = BenchSpec(
        model=model, img_size=img_size, batch_size=batch_size, steps=steps, warmup=warmup,
        precision=precision, compile=compile_, visible_only=visible_only, reference=reference,
        device=str(chosen),
    )
    logger = logging.getLogger("cratemae")
    handler = console.LogHandler()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_bench(spec)
    finally:
        logger.removeHandler(handler)
    # The training rate of this model on this device, for bench-data and the dry run to say
    # how many loader workers would feed it (the last run's figure stands).
    record_rate(model_key(model, img_size, chosen), result["paths"]["fast"]["images_per_s"])
    print(strict_json(result) if json_ else _report(result))


def _report(r: dict[str, Any]) -> str:
    s = r["spec"]
    encoder = "visible-only encoder" if s["visible_only"] else "full-sequence encoder"
    lines = [
        f"{s['model']} at {s['img_size']} px, batch {s['batch_size']}, "
        f"{s['precision_in_effect']}, {'compiled' if s['compile'] else 'eager'}, {encoder}; "
        f"{r['device_name']}; median of {s['steps']} steps after {s['warmup']} warm-up",
    ]
    for name, c in r["checks"].items():
        lines.append(
            f"check {name:<9}  vs the reference in float64: loss rel. err {c['loss_rel_err']:.1e} "
            f"(allowed {c['allowed_loss']:.1e}), worst gradient rel. err "
            f"{c['grad_rel_err']:.1e} (allowed {c['allowed_grad']:.1e}): ok"
        )
    for name, p in r["paths"].items():
        lines.append(
            f"{name:<9}  {p['images_per_s']:,.1f} img/s (min {p['images_per_s_min']:,.1f}, "
            f"max {p['images_per_s_max']:,.1f})  {p['peak_memory_gib']:.2f} GiB "
            f"{r['memory_kind']}  {p['tflop_per_s']:.3g} TFLOP/s at "
            f"{p['gflop_per_image']:.3g} GFLOP/image"
        )
    if "speedup" in r:
        lines.append(f"fast / reference: {r['speedup']:.2f}x images/s (medians, same process)")
    lines.append(f"FLOPs: {r['flop_count']}")
    return "\n".join(lines)
