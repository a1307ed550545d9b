"""`cratemae embed`: the features of a data set out of a trained encoder, to a file."""

from __future__ import annotations

from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import CheckpointOpt, JsonOpt, command_console, require_checkpoint
from cratemae.errors import BadInputError
from cratemae.fs import strict_json

__all__ = ["embed"]


class EmbedFormat(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    safetensors = "safetensors"
    npy = "npy"


class EmbedPool(str, Enum):  # noqa: UP042
    cls = "cls"
    mean = "mean"


# --pool's words -> the probe's (probe.pool), which the file records.
_POOL = {EmbedPool.cls: "token", EmbedPool.mean: "avg"}


def _parse_layers(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise BadInputError(f"--layers {text}: expected layer numbers separated by commas, "
                            "e.g. 3,7,11 (0 is the first layer, -1 the last)") from None


def embed(
    data: Annotated[list[str], typer.Argument(
        metavar="DATA...", show_default=False,
        help="Image folder, cratemae shard directory, tar shards (patterns), demo:val, image "
        "files, or @LIST (a text file naming one image file per line).")],
    checkpoint: CheckpointOpt,
    out: Annotated[Path, typer.Option("--out", metavar="PATH", show_default=False,
                                      help="File (safetensors) or directory (npy) to write.")],
    format_: Annotated[EmbedFormat, typer.Option("--format", help="File format.")
                       ] = EmbedFormat.safetensors,
    pool: Annotated[EmbedPool, typer.Option(
        "--pool", help="cls: the CLS token (the probe's default); mean: the mean of the patch "
        "tokens.")] = EmbedPool.cls,
    layers: Annotated[str | None, typer.Option(
        "--layers", metavar="I,J,...", show_default=False,
        help="Also the pooled features of these layers (0 is the first, -1 the last), "
        "through the final norm as the probe takes them.")] = None,
    split: Annotated[str, typer.Option(
        "--split", metavar="val|train",
        help="Split to read of a shard directory or a folder of split folders.")] = "val",
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1)] = 64,
    workers: Annotated[int, typer.Option("--workers", metavar="N", min=0,
                                         help="DataLoader workers per process.")] = 4,
    chunk_size: Annotated[int, typer.Option(
        "--chunk-size", metavar="N", min=1,
        help="Samples per chunk written while running (memory holds one chunk).")] = 4096,
    device: Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda|cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(
        "--precision", metavar="bf16|fp16|fp32",
        help="Autocast on a GPU (as the probe's run.precision); always fp32 on a CPU.")
        ] = "bf16",
    max_bad_fraction: Annotated[float, typer.Option(
        "--max-bad-fraction", metavar="F", min=0.0, max=1.0,
        help="Stop if more of the images than this cannot be read (data.max_bad_fraction "
        "in the messages); those that cannot are kept as zero rows marked invalid.")] = 0.01,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace PATH if it exists, and discard the chunks of an "
        "interrupted embed made with other settings.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Write the encoder's features of every sample of DATA.

    Images get the evaluation transform (resize, centre crop at the model's size, the
    model's mean/std). The file holds `features` (N, d), `layers.I` for --layers, the
    sample keys (file paths, or WebDataset keys), `labels` when the data have them, and the
    model's identity (architecture, checkpoint SHA-256) as metadata; read it with
    cratemae.eval.embeddings.read_embeddings. Chunks are written to PATH.parts/ while it
    runs: an interrupted embed, run again the same way, goes on from them. Under
    torchrun/srun every rank embeds its share and rank 0 writes PATH.

    Examples:
      $ cratemae embed data/val --checkpoint runs/base --out val.safetensors
      $ cratemae embed demo:val --checkpoint runs/demo --out demo.safetensors --layers 1,2
      $ cratemae embed a.jpg b.jpg @more.txt --checkpoint exported/base --out x --format npy
      $ torchrun --nproc-per-node 8 -m cratemae embed /data/in1k --split train \\
          --checkpoint runs/base --out in1k-train.safetensors --pool mean
    """
    require_checkpoint(checkpoint)
    if precision not in ("bf16", "fp16", "fp32"):
        raise BadInputError(f"--precision {precision}: expected bf16, fp16 or fp32")
    if split not in ("val", "train"):
        raise BadInputError(f"--split {split}: expected val or train")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise BadInputError(f"--out {out}: exists; pass --overwrite to replace it")
    wanted = _parse_layers(layers)
    from cratemae import __version__
    from cratemae.distributed import dist
    from cratemae.distributed.device import choose_device
    from cratemae.distributed.precision import resolve_precision
    from cratemae.eval.embed import EmbedSettings
    from cratemae.eval.embed import embed as run_embed
    from cratemae.eval.embed_data import data_source
    from cratemae.weights.export import timm_call
    from cratemae.weights.load import checkpoint_digest, load_encoder

    info = dist.init_distributed()
    try:
        where = choose_device(device, local_rank=info.local_rank)
        loaded = load_encoder(checkpoint, device=where)
        source = data_source(data, split)
        settings = EmbedSettings(
            pool=_POOL[pool], layers=wanted, batch_size=batch_size, num_workers=workers,
            chunk_size=chunk_size, precision=resolve_precision(precision, where).name,
            format=format_.value, max_bad_fraction=max_bad_fraction)
        identity = {"architecture": timm_call(loaded.config)["model_name"],
                    "checkpoint": str(checkpoint), "checkpoint_sha256":
                    checkpoint_digest(checkpoint), "model": loaded.config.to_dict(),
                    "data": list(data), "cratemae_version": __version__}
        with command_console("embed"), ExitStack() as stack:
            bars: list[console.Tracker] = []  # opened at the first images, after the checks

            def on_progress(done: int, total: int) -> None:
                if not bars:
                    bars.append(stack.enter_context(console.progress(total, "embed: images")))
                bars[0].set(done, total)

            result = run_embed(loaded.encoder, source, out, settings, mean=loaded.mean,
                               std=loaded.std, identity=identity, device=where,
                               overwrite=overwrite,
                               progress=on_progress if dist.is_main_process() else None)
    finally:
        dist.destroy_distributed()
    if not result.main_process:
        return
    summary = {"out": str(result.out), "num_samples": result.num_samples, "dim": result.dim,
               "labelled": result.labelled, "bad_samples": result.bad_samples,
               "pool": settings.pool, "layers": result.metadata["layers"],
               "checkpoint_sha256": identity["checkpoint_sha256"]}
    if json_:
        print(strict_json(summary))
        return
    typer.echo(f"wrote {result.num_samples} x {result.dim} features "
               f"({pool.value} of the last layer"
               + (f", and of layers {','.join(map(str, result.metadata['layers']))}"
                  if wanted else "")
               + f"{', with labels' if result.labelled else ''}) to {result.out}")
