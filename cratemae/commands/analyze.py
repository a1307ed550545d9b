"""`cratemae analyze`: measure what each encoder layer does (coding rate, sparsity,
attention, PCA of features) and draw it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import JsonOpt, require_file
from cratemae.errors import BadInputError
from cratemae.fs import strict_json
from cratemae.rundir import RunFiles

if TYPE_CHECKING:
    import torch

    from cratemae.analysis import Analysis
    from cratemae.weights.load import LoadedModel

__all__ = ["analyze"]

ImagesArg = Annotated[
    list[Path] | None,
    typer.Argument(metavar="IMAGE...", help="Image files to analyse.", show_default=False),
]
# layers.png's title: the model and what its coding rate is measured against.
_FAMILY = {"crate": "CRATE: MSSA subspaces", "vit": "MAE ViT: per-head value projections"}
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        metavar="CKPT",
        show_default=False,
        help="Checkpoint to analyse: a checkpoint or run directory, or a weights file "
        "(default: the newest run under ./runs).",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        metavar="SHARDS",
        show_default=False,
        help="Images from data instead: shards, a folder, or demo:val.",
    ),
]


def analyze(
    images: ImagesArg = None,
    checkpoint: CheckpointOpt = None,
    data: DataOpt = None,
    num_images: Annotated[
        int, typer.Option("--num-images", metavar="N", help="Images to read from --data.")
    ] = 64,
    out: Annotated[
        Path, typer.Option("--out", metavar="DIR", help="Directory to write into.")
    ] = Path("analysis"),
    pca_layer: Annotated[
        int,
        typer.Option(
            "--pca-layer",
            metavar="L",
            help="Layer whose patch features the PCA shows, numbered from 0 as probe.layer "
            "and embed's --layers (0 = first, -1 = last).",
        ),
    ] = -1,
    pictures: Annotated[
        int,
        typer.Option(
            "--pictures", metavar="N", help="With --data: how many of its images to draw."
        ),
    ] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", metavar="B")] = 32,
    device: Annotated[
        str, typer.Option("--device", metavar="auto|cpu|cuda|cuda:N",
                          help="Where to run the model.")
    ] = "auto",
    json_: JsonOpt = False,
) -> None:
    """Measure what each encoder layer does and draw it.

    Writes layers.json: per depth, the coding rate R^c of the tokens
    against the layer's subspaces and their sparsity (mean, std over
    images); layers.png; and per image drawn, attention-IMAGE.png (CLS
    attention per head, last two layers) and pca-IMAGE.png (first three
    principal components of patch features as RGB).

    Image files are fitted to the model's input as evaluation fits them
    (short side to size*256/224, then the centre square), as --data's are.

    CRATE: the subspaces are each layer's MSSA U_k; sparsity is that of
    its ISTA output. MAE ViT (no subspaces of its own): each head's slice
    of the layer's value projection stands for U_k; sparsity is that of
    the block's output, dense (about 1) by design.

    Examples:
      $ cratemae analyze photo.jpg other.png        # the newest run under ./runs
      $ cratemae analyze --checkpoint runs/demo photo.jpg other.png
      $ cratemae analyze --checkpoint runs/demo --data demo:val --num-images 256
      $ cratemae analyze --checkpoint runs/base --data val-{00..63}.tar --json
      $ cratemae analyze --checkpoint model.safetensors a.jpg --pca-layer 5
    """
    _check_options(images or [], data, num_images, batch_size, pictures)
    from cratemae.analysis.plots import require_matplotlib

    require_matplotlib()  # fail before any work is done
    from cratemae.analysis import analyze as run_analysis
    from cratemae.distributed.device import choose_device
    from cratemae.weights.load import load_encoder

    where = choose_device(device)
    found = _checkpoint(checkpoint)
    _check_out(out, found, images or [])
    model = load_encoder(found, device=where)
    if not model.preprocessing_known:
        console.warn(f"{model.path}: no recipe saved with it; assuming ImageNet mean and std")
    layer = _layer(pca_layer, model.config.depth)
    console.log(f"PCA of the patch features of layer {layer} (of 0..{model.config.depth - 1})")
    total, names, batches = _inputs(model, images or [], data, num_images, batch_size, pictures)
    with console.progress(total, "analyze") as bar:
        result = run_analysis(
            model, batches, names=names, pca_layer=layer, device=where, on_batch=bar.advance
        )
    summary = _write(result, model, out, source=data or [str(p) for p in images or []])
    if json_:
        print(strict_json(summary))


def _checkpoint(checkpoint: Path | None) -> Path:
    """`--checkpoint`, else the newest run's latest checkpoint under ./runs (said so)."""
    if checkpoint is not None:
        return checkpoint
    from cratemae.checkpoints.resolve import resolve_checkpoint

    found = resolve_checkpoint(None, wanted="run with a checkpoint")
    console.log(f"using {found} (the newest run under ./runs; --checkpoint chooses another)")
    return found


def _check_options(
    images: list[Path], data: str | None, num_images: int, batch_size: int, pictures: int
) -> None:
    if bool(images) == (data is not None):
        raise BadInputError("give image files or --data SHARDS (one of the two)")
    for image in images:
        require_file(image, "image")
    for flag, value in (("--num-images", num_images), ("--batch-size", batch_size)):
        if value < 1:
            raise BadInputError(f"{flag} {value}: expected a positive number")
    if pictures < 0:
        raise BadInputError(f"--pictures {pictures}: expected 0 or more")


def _layer(value: int, depth: int) -> int:
    """--pca-layer as a layer index from 0 (negative: from the end, -1 the last)."""
    if -depth <= value < depth:
        return value % depth
    raise BadInputError(
        f"--pca-layer {value}: the model has layers 0..{depth - 1} (or -1..-{depth} from the "
        f"end; layers are numbered from 0)"
    )


def _check_out(out: Path, checkpoint: Path, images: list[Path]) -> None:
    """--out must be a directory this command may write, before any work: not a special
    file, not the checkpoint read (nor inside or holding it, nor any run's checkpoints/),
    nor holding an image read (`cratemae.guard.check_output`)."""
    from cratemae.checkpoints.resolve import resolve_checkpoint
    from cratemae.guard import check_output

    check_output(out, kind="dir", reads=[resolve_checkpoint(checkpoint), *images])


def _names(paths: list[Path]) -> list[str]:
    """File stems safe in a file name, made unique (a.jpg, x/a.png -> a, a-2)."""
    names: list[str] = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem) or "image"
        name, n = stem, 1
        while name in names:
            n += 1
            name = f"{stem}-{n}"
        names.append(name)
    return names


def _inputs(
    model: LoadedModel,
    images: list[Path],
    data: str | None,
    num_images: int,
    batch_size: int,
    pictures: int,
) -> tuple[int, list[str], Iterator[torch.Tensor]]:
    """(number of images, names of those to draw, batches of normalised images)."""
    size = model.config.img_size
    if data is None:
        return len(images), _names(images), _image_batches(model, images, batch_size)
    from cratemae.data import build_loader
    from cratemae.recipe.schema import DataSection

    section = DataSection(
        val=data, batch_size=batch_size, num_workers=0, mean=model.mean, std=model.std
    )
    # Split "val" with the pre-training task: evaluation transform, fixed order, every sample
    # kept, and no labels needed.
    loader = build_loader(section, split="val", labels=False, img_size=size, seed=0,
                          epoch=0)
    total = min(num_images, loader.num_samples)
    if total < num_images:
        console.warn(f"--data {data} holds {total} images, fewer than --num-images {num_images}")
    names = [f"sample-{i:04d}" for i in range(min(pictures, total))]
    return total, names, _take(loader, total)


def _image_batches(
    model: LoadedModel, images: list[Path], batch_size: int
) -> Iterator[torch.Tensor]:
    """Image files -> normalised batches (B, 3, S, S), read one batch at a time, each image
    fitted as evaluation fits it (`image_to_tensor`'s "eval": the crop --data gets too)."""
    import torch

    from cratemae.data.transforms import image_to_tensor

    size = model.config.img_size
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield torch.stack([image_to_tensor(path, size, model.mean, model.std) for path in chunk])


def _take(loader: Any, count: int) -> Iterator[torch.Tensor]:
    """The first `count` images of the loader, in batches."""
    left = count
    for batch in loader:
        imgs = batch.model_input("cpu")[:left]
        left -= imgs.shape[0]
        yield imgs
        if left <= 0:
            return


def _write(result: Analysis, model: LoadedModel, out: Path, source: Any) -> dict[str, Any]:
    """layers.json, layers.png and the pictures; returns what layers.json holds."""
    from cratemae.analysis.plots import plot_attention, plot_layers, plot_pca

    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "checkpoint": str(model.path),
        "source": source,
        "pixel_mean": list(model.mean),
        "pixel_std": list(model.std),
        **result.to_json(),
    }
    from cratemae.fs import atomic_write_json

    atomic_write_json(RunFiles(out).layers, summary, indent=2)
    written = [
        RunFiles(out).layers,
        plot_layers(
            result.layers,
            out / "layers.png",
            title=f"{model.path.name} ({_FAMILY[model.config.family]}), "
            f"{result.num_images} images",
        ),
    ]
    for pic in result.pictures:
        written.append(plot_attention(pic.image, pic.attention, out / f"attention-{pic.name}.png"))
        if pic.pca_rgb is not None:
            written.append(
                plot_pca(pic.image, pic.pca_rgb, result.pca_layer, out / f"pca-{pic.name}.png")
            )
    console.log(f"wrote {len(written)} files to {out}")
    return summary
