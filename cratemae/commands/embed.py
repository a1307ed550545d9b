"""`cratemae embed`: the features of a data set out of a trained encoder, to a file."""

from __future__ import annotations

import os
from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import CheckpointOpt, JsonOpt, command_console, require_checkpoint
from cratemae.errors import BadInputError
from cratemae.fs import strict_json

if TYPE_CHECKING:
    from cratemae.data.sources import Source
    from cratemae.eval.embed import EmbedResult, EmbedSettings
    from cratemae.weights.load import LoadedModel

__all__ = ["embed"]


class EmbedFormat(str, Enum):  # noqa: UP042 (StrEnum needs Python 3.11)
    safetensors = "safetensors"
    npy = "npy"


# --pool takes timm's words, which probe.pool and the file's metadata use; the older words
# are deprecated aliases (cratemae.eval.embeddings.POOL_ALIASES).
_POOLS = ("token", "avg")
_OLD_POOLS = {"cls": "token", "mean": "avg"}


def _parse_pool(text: str) -> tuple[str, str | None]:
    """(pool, deprecation warning or None) of --pool."""
    word = text.strip().lower()
    if word in _POOLS:
        return word, None
    if word in _OLD_POOLS:
        new = _OLD_POOLS[word]
        return new, f"--pool {word} is deprecated: use --pool {new} (the word probe.pool uses)"
    raise BadInputError(f"--pool {text}: expected token (the CLS token) or avg (the mean of "
                        "the patch tokens)")


def default_workers() -> int:
    """DataLoader workers per process when --workers is not given: the CPUs this process may
    use, shared by the processes of this node, at most 8; 0 (load in the process) when that
    leaves one CPU or none."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    share = cpus // local
    return 0 if share <= 1 else min(8, share)


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
    pool: Annotated[str, typer.Option(
        "--pool", metavar="token|avg",
        help="token: the CLS token (probe.pool's default); avg: the mean of the patch tokens "
        "(cls and mean: deprecated names of the same).")] = "token",
    layers: Annotated[str | None, typer.Option(
        "--layers", metavar="I,J,...", show_default=False,
        help="Also the pooled features of these encoder layers, numbered as probe.layer: 0 "
        "is the first, -1 the last, negative from the end; through the final norm as the "
        "probe takes them.")] = None,
    split: Annotated[str, typer.Option(
        "--split", metavar="val|train",
        help="Split to read of a shard directory or a folder of split folders.")] = "val",
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="N", min=1)] = 64,
    workers: Annotated[int | None, typer.Option(
        "--workers", metavar="N", min=0, show_default=False,
        help="DataLoader workers per process (default: the CPUs this process may use, at "
        "most 8; 0 on one CPU).")] = None,
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
          --checkpoint runs/base --out in1k-train.safetensors --pool avg
    """
    require_checkpoint(checkpoint)
    if precision not in ("bf16", "fp16", "fp32"):
        raise BadInputError(f"--precision {precision}: expected bf16, fp16 or fp32")
    if split not in ("val", "train"):
        raise BadInputError(f"--split {split}: expected val or train")
    reads = _check_out(out, format_, checkpoint, data)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise BadInputError(f"--out {out}: exists; pass --overwrite to replace it")
    wanted = _parse_layers(layers)
    pool_name, deprecated = _parse_pool(pool)
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
        if deprecated and dist.is_main_process():
            console.warn(deprecated)
        where = choose_device(device, local_rank=info.local_rank)
        loaded = load_encoder(checkpoint, device=where)
        source = data_source(data, split)
        _check_not_data(out, source, reads)
        settings = EmbedSettings(
            pool=pool_name, layers=wanted, batch_size=batch_size,
            num_workers=default_workers() if workers is None else workers,
            chunk_size=chunk_size, precision=resolve_precision(precision, where).name,
            format=format_.value, max_bad_fraction=max_bad_fraction)
        identity = {"architecture": timm_call(loaded.config)["model_name"],
                    "checkpoint": str(checkpoint), "checkpoint_sha256":
                    checkpoint_digest(checkpoint), "model": loaded.config.to_dict(),
                    "data": list(data), "split": split, "cratemae_version": __version__,
                    "preprocessing": _preprocessing(loaded)}
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
    if result.main_process:
        _report(result, settings, identity, json_)


def _check_out(out: Path, format_: EmbedFormat, checkpoint: Path, data: list[str]
               ) -> list[Path]:
    """Refuse (exit 2) an --out, or its PATH.parts, that is a special file, lies on or in
    the checkpoint, its run or the data named, or in a run's checkpoints. Returns what is
    read, for `_check_not_data`."""
    from cratemae.checkpoints.resolve import resolve_checkpoint, run_dir_of
    from cratemae.guard import check_output
    from cratemae.rundir import MODEL_FILE

    target = resolve_checkpoint(checkpoint)
    weights = target if target.is_file() else target / MODEL_FILE
    run = run_dir_of(weights)
    reads = [checkpoint, target, weights, *([run] if run else [])]
    reads += [Path(d.removeprefix("@")) for d in data if Path(d.removeprefix("@")).exists()]
    npy = out.is_dir() or (not out.exists() and format_ is EmbedFormat.npy)
    check_output(out, kind="dir" if npy else "file", reads=reads)
    check_output(out.with_name(out.name + ".parts"), kind="dir", reads=reads)
    return reads


def _check_not_data(out: Path, source: Source, reads: list[Path]) -> None:
    """Refuse an --out that is one of the data's files (a tar shard, an image of a list):
    only those named as --out is are compared, as there may be millions."""
    from cratemae.guard import check_output

    same_name = [Path(url) for s in source.shards
                 for url in [s.url, *(f for f, _ in s.files or ())]
                 if Path(url).name == out.name]
    if same_name:
        check_output(out, kind="dir" if out.is_dir() else "file", reads=[*reads, *same_name])


def _preprocessing(loaded: LoadedModel) -> str:
    """Where the image size, mean and std come from (nothing overrides them)."""
    if loaded.preprocessing_known:
        return "the checkpoint's"
    return "the checkpoint's size; ImageNet's mean and std, assumed: the checkpoint records none"


def _report(result: EmbedResult, settings: EmbedSettings, identity: dict[str, Any],
            json_: bool) -> None:
    layers = result.metadata["layers"]
    summary = {"out": str(result.out), "num_samples": result.num_samples, "dim": result.dim,
               "labelled": result.labelled, "bad_samples": result.bad_samples,
               "pool": settings.pool, "layers": layers,
               "checkpoint_sha256": identity["checkpoint_sha256"]}
    if json_:
        print(strict_json(summary))
        return
    typer.echo(f"wrote {result.num_samples} x {result.dim} features ({settings.pool} of the "
               "last layer" + (f", and of layers {','.join(map(str, layers))}" if layers else "")
               + f"{', with labels' if result.labelled else ''}) to {result.out}")
