"""Embeddings of every sample of a data set, out of a frozen encoder, streamed to disk.

The images go through the evaluation transform (resize + centre crop at the model's size,
the model's mean/std) and the encoder's own forward; each rank encodes its share of the data
(as evaluation does: `cratemae.eval.classify`) and writes it in chunks of about
`chunk_size` samples, so memory holds one chunk whatever the size of the data:

    OUT.parts/embed.json                      the settings the chunks were made with
    OUT.parts/rank-00000-of-00002/chunk-000000.safetensors ...

Each chunk file is written atomically and records the data-set positions of its rows.
When every rank is done, rank 0 streams the chunks, in data-set order and without the
sample a short rank repeats, into OUT (written under a temporary name, renamed at the end;
`cratemae.eval.embeddings` says what it holds), and removes OUT.parts. An embed that dies
leaves OUT.parts: run the same command again and it goes on from the chunks written (other
settings are refused, `overwrite` starts again; a chunk damaged since is computed again).
OUT.parts must be on a file system every rank sees.

Rank 0 holds a lock beside OUT (`embed_chunks.PartsLock`) from start to end, so a second
embed into the same OUT is refused at once instead of sharing its chunks. A readable image
whose features are not finite (weights with NaN, an fp16 overflow) stops the embed with the
sample's key (exit 1): a row marked valid is always finite, and a row of an image that could
not be read is zero and marked invalid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cratemae.data import Loader
from cratemae.data.sources import Source
from cratemae.distributed import dist
from cratemae.distributed.precision import Precision, resolve_precision
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.eval.classify import sample_positions
from cratemae.eval.embed_chunks import (
    PartsLock,
    assemble,
    chunk_arrays,
    chunk_name,
    chunk_problem,
    complete_prefix,
    record_tag,
    write_chunk,
)
from cratemae.eval.embed_data import KeyedBatch, keyed_loader
from cratemae.eval.embed_out import parts_dir, prepare_out, remove_debris
from cratemae.eval.embeddings import FORMAT, POOL_ALIASES, layer_name
from cratemae.model import CrateEncoder
from cratemae.recipe.schema import DataSection

__all__ = ["EmbedResult", "EmbedSettings", "embed", "parts_dir"]

log = logging.getLogger("cratemae")
Progress = Callable[[int, int], None]  # (samples done on this rank, samples on this rank)

POOLS = ("token", "avg")


@dataclass(frozen=True)
class EmbedSettings:
    """How the embeddings are taken and written (all of it decides the bytes written)."""

    pool: str = "token"  # "token": the CLS token; "avg": the mean of the patch tokens (timm's)
    layers: tuple[int, ...] = ()  # more layers to pool (0-based, negative from the end)
    batch_size: int = 64
    num_workers: int = 4
    chunk_size: int = 4096  # samples per chunk file, rounded up to whole batches
    precision: str = "fp32"  # in effect (`resolve_precision`): "fp32", "bf16", "fp16"
    format: str = "safetensors"  # or "npy"
    max_bad_fraction: float = 0.01


@dataclass(frozen=True)
class EmbedResult:
    out: Path
    num_samples: int
    dim: int
    labelled: bool
    bad_samples: int
    resumed_chunks: int
    main_process: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


# --- the features -------------------------------------------------------------------------
def check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """Layer indices as stored (0..depth-1, in the order given, no repeats)."""
    bad = [i for i in layers if not -depth <= i < depth]
    if bad:
        raise BadInputError(f"--layers {','.join(map(str, layers))}: the encoder has {depth} "
                            f"layers (valid: {-depth}..{depth - 1}, 0 is the first)")
    out = tuple(dict.fromkeys(i % depth for i in layers))
    return out


@torch.inference_mode()
def encode_batch(encoder: CrateEncoder, images: torch.Tensor, pool: str,
                 layers: Sequence[int], precision: Precision) -> dict[str, torch.Tensor]:
    """(B, C, H, W) -> {"features": (B, d), "layers.I": (B, d), ...}, float32: the pooled
    output of the last layer (after the final norm, `forward_features`), and of each layer
    of `layers` through the final norm too (`forward_intermediates(norm=True)`), as the
    probe takes features of a layer."""
    p = encoder.num_prefix_tokens
    with precision.autocast():
        if layers:
            last, inter = encoder.forward_intermediates(
                images, list(layers), return_prefix_tokens=True, norm=True, output_fmt="NLC")
        else:
            last, inter = encoder.forward_features(images), []  # (B, 1+L, d)
    out = {"features": last[:, p:].mean(dim=1) if pool == "avg" else last[:, 0]}
    for i, (patches, prefix) in zip(layers, inter, strict=True):  # (B, L, d), (B, 1, d)
        out[layer_name(i)] = patches.mean(dim=1) if pool == "avg" else prefix[:, 0]
    return {k: v.float() for k, v in out.items()}


# --- the run ------------------------------------------------------------------------------
def embed(
    encoder: CrateEncoder,
    source: Source,
    out: Path,
    settings: EmbedSettings,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    identity: dict[str, Any],
    device: torch.device,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> EmbedResult:
    """Embed every sample of `source` into `out` (see the module's docstring), on every rank
    of the process group (or alone). `identity` (architecture, checkpoint_sha256, model
    configuration, ...) goes into the file's metadata; its `checkpoint_sha256`, the data's
    shards and files, and `settings` decide whether leftover chunks may be resumed."""
    out = Path(out)
    pool = POOL_ALIASES.get(settings.pool, settings.pool)
    if pool not in POOLS:
        raise BadInputError(f"pool {settings.pool!r}: expected one of {', '.join(POOLS)}")
    layers = check_layers(settings.layers, len(encoder.blocks))
    settings = replace(settings, pool=pool, layers=layers)
    data = DataSection(batch_size=settings.batch_size, num_workers=settings.num_workers,
                       mean=tuple(mean), std=tuple(std),
                       max_bad_fraction=settings.max_bad_fraction)
    record = {"format": FORMAT, **asdict(settings), "img_size": encoder.config.img_size,
              "mean": mean, "std": std, "world_size": dist.get_dist_info().world_size,
              "checkpoint_sha256": identity.get("checkpoint_sha256"),
              "data": _source_digest(source)}
    record = json.loads(json.dumps(record, allow_nan=False))  # as the settings file reads
    with ExitStack() as held:  # rank 0 holds the lock of `out` from start to end
        error = None
        if dist.is_main_process():
            try:
                held.enter_context(PartsLock(out))
                prepare_out(out, parts_dir(out), record, overwrite)
            except BadInputError as err:
                error = err
        dist.raise_together(error, f"{parts_dir(out)}: refused on rank 0")
        dist.barrier()
        return _run(encoder, source, out, settings, data, record, identity, device, progress)


def _run(encoder: CrateEncoder, source: Source, out: Path, settings: EmbedSettings,
         data: DataSection, record: dict[str, Any], identity: dict[str, Any],
         device: torch.device, progress: Progress | None) -> EmbedResult:
    """Every rank: its share into chunks; then rank 0 assembles `out`."""
    info, parts = dist.get_dist_info(), parts_dir(out)
    log.info("images at %d px, mean %s and std %s (%s); %d loader worker(s) per process",
             record["img_size"], record["mean"], record["std"],
             identity.get("preprocessing", "as given"), settings.num_workers)
    mine = _rank_dir(parts, info.rank, info.world_size)
    loader, n_chunks, done_chunks, failed = _embed_share(
        encoder, source, data, settings, record, mine, device, progress)
    dist.raise_together(failed or loader.bad_fraction_error(final=True),
                        "another rank could not embed its share")
    dist.barrier()
    result: EmbedResult | None = None
    error = None
    if dist.is_main_process():
        try:
            result = _assemble(out, parts, info.world_size, n_chunks, settings, identity,
                               source, record, done_chunks)
        except Exception as err:  # raised here after the others have heard of it
            error = err
    dist.raise_together(error, f"rank 0 could not assemble {out}")
    dist.barrier()
    if result is None:
        return EmbedResult(out, 0, 0, False, 0, done_chunks, main_process=False)
    return result


def _embed_share(encoder: CrateEncoder, source: Source, data: DataSection,
                 settings: EmbedSettings, record: dict[str, Any], mine: Path,
                 device: torch.device, progress: Progress | None
                 ) -> tuple[Loader, int, int, CrateMAEError | None]:
    """This rank's share into chunk files in `mine`, from the first chunk not yet there (or
    damaged). Returns the loader (for its bad-sample count), the rank's chunk count, how
    many were there already, and the error that stopped it (a non-finite feature)."""
    info, img_size, tag = dist.get_dist_info(), record["img_size"], record_tag(record)
    mine.mkdir(parents=True, exist_ok=True)
    remove_debris(mine)
    full = keyed_loader(source, data, img_size, info.rank, info.world_size, 0)
    plan = full.plan
    per_chunk = max(1, -(-settings.chunk_size // settings.batch_size))  # batches per chunk
    n_chunks = -(-plan.num_batches // per_chunk)

    def rows(k: int) -> int:  # the samples of chunk k
        return sum(plan.batch_len(b) for b in range(k * per_chunk,
                                                    min((k + 1) * per_chunk, plan.num_batches)))

    done_chunks = complete_prefix(mine, n_chunks, chunk_arrays(settings.layers), tag, rows,
                                  remove=True)
    start = min(done_chunks * per_chunk, plan.num_batches)
    if done_chunks:
        log.info("resuming: %d of %d chunks of rank %d already written in %s", done_chunks,
                 n_chunks, info.rank, mine)
    # (n,) int64: 8 bytes a sample, not a Python list's ~36
    positions = torch.tensor(sample_positions(full), dtype=torch.int64)
    skipped = sum(plan.batch_len(b) for b in range(start))
    encoder.eval().to(device)
    loader = keyed_loader(source, data, img_size, info.rank, info.world_size, start)
    failed = _run_chunks(encoder, loader, settings, positions, skipped, per_chunk, start, mine,
                         device, progress, tag)
    return loader, n_chunks, done_chunks, failed


def _run_chunks(encoder: CrateEncoder, loader: Loader, settings: EmbedSettings,
                positions: torch.Tensor, skipped: int, per_chunk: int, start: int, where: Path,
                device: torch.device, progress: Progress | None, tag: str
                ) -> CrateMAEError | None:
    """Encode this rank's batches from `start` on, writing one chunk file per `per_chunk`
    batches (tagged `tag`). A readable image whose features are not finite stops it, and
    is returned as the error: no row marked valid is ever written non-finite."""
    precision = resolve_precision(settings.precision, device)
    total, done, b = len(positions), skipped, start
    pending: list[dict[str, Any]] = []
    with PreemptionFlag() as stop:
        for batch in loader:
            if stop.requested and not pending:  # at a chunk's end: what is written is whole
                return _stopped(stop, where, done, total)
            failed = _encode_into(encoder, batch, settings, precision, positions[done:],
                                  device, pending)
            if failed is not None:
                return failed
            done, b = done + len(batch), b + 1
            if b % per_chunk == 0 or b == loader.plan.num_batches:
                write_chunk(where / chunk_name((b - 1) // per_chunk), pending, tag)
                pending = []
            if progress is not None:
                progress(done, total)
        return None


def _stopped(stop: PreemptionFlag, where: Path, done: int, total: int) -> CrateMAEError:
    """The error (exit 3, as a stopped training run) of an embed stopped by a signal between
    chunks: the chunks written stay, and the same command goes on from them."""
    name = signal.Signals(stop.signum or signal.SIGTERM).name
    return CrateMAEError(f"stopped by {name} after {done} of {total} samples: the chunks "
                         f"written are kept in {where.parent}; run the same command again to "
                         "go on from them", exit_code=EXIT_REQUEUE)


def _encode_into(encoder: CrateEncoder, batch: Any, settings: EmbedSettings,
                 precision: Precision, positions: torch.Tensor, device: torch.device,
                 pending: list[dict[str, Any]]) -> CrateMAEError | None:
    """Append one batch's rows to `pending`; the error if a readable image's features are
    not finite (never written as a valid row)."""
    assert isinstance(batch, KeyedBatch)
    n = len(batch)
    feats = encode_batch(encoder, batch.model_input(device),
                         settings.pool, settings.layers, precision)
    valid = batch.valid if batch.valid is not None else torch.ones(n, dtype=torch.bool)
    row = {k: torch.where(valid[:, None], v.cpu(), 0.0) for k, v in feats.items()}
    bad = _first_nonfinite(row)
    if bad is not None:
        name, i = bad
        hint = ("its weights may hold NaN or inf" if settings.precision == "fp32" else
                "it overflows: embed again with --precision fp32 --overwrite")
        return CrateMAEError(f"sample {batch.keys[i]!r} gave non-finite {name} out of the "
                             f"encoder at precision {settings.precision}; {hint}")
    row |= {"labels": batch.labels, "valid": valid, "keys": batch.keys,
            "positions": positions[:n]}
    pending.append(row)
    return None


def _first_nonfinite(row: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(array, row) of the first non-finite value among the (B, d) arrays of `row`."""
    for name, v in row.items():
        finite = torch.isfinite(v).all(dim=1)  # (B,)
        if not bool(finite.all()):
            return name, int((~finite).nonzero()[0])
    return None


def _source_digest(source: Source) -> str:
    """A hash of what the data are: the shards, their counts and, for folders and lists,
    their files (a folder that gained a file is other data)."""
    h = hashlib.sha256()
    for s in source.shards:
        h.update(json.dumps([s.url, s.count, s.files], allow_nan=False).encode(
            "utf-8", "surrogateescape"))
    return h.hexdigest()


def _assemble(out: Path, parts: Path, world: int, n_chunks: int, settings: EmbedSettings,
              identity: dict[str, Any], source: Source, record: dict[str, Any],
              resumed: int) -> EmbedResult:
    """Rank 0: every rank's chunks -> `out`; then the chunks go."""
    files = []
    for r in range(world):
        where = _rank_dir(parts, r, world)
        names, tag = chunk_arrays(settings.layers), record_tag(record)
        k = complete_prefix(where, n_chunks, names, tag)
        if k < n_chunks and (where / chunk_name(k)).is_file():
            raise CrateMAEError(f"{where / chunk_name(k)}: damaged chunk "
                                f"({chunk_problem(where / chunk_name(k), names, tag)}); run the "
                                "same command again: it is computed again")
        if k < n_chunks:
            raise BadInputError(f"{where}: rank {r}'s chunks are not all there; --out must be "
                                "on a file system that every rank sees")
        files += [where / chunk_name(k) for k in range(n_chunks)]
    depth = int(identity.get("model", {}).get("depth", 0))
    meta = {"format": FORMAT, **identity, "pool": settings.pool, "layer": depth - 1,
            "layers": list(settings.layers), "img_size": record["img_size"],
            "mean": record["mean"], "std": record["std"], "precision": settings.precision,
            "classes": list(source.classes) if source.classes else None}
    want = sum(int(s.count or 0) for s in source.shards)
    meta = assemble(out, files, settings.layers, settings.format, meta, num_samples=want)
    shutil.rmtree(parts, ignore_errors=True)
    log.info("wrote %d embeddings of %d dimensions to %s", meta["num_samples"], meta["dim"], out)
    return EmbedResult(out, meta["num_samples"], meta["dim"], meta["labelled"],
                       meta["bad_samples"], resumed, True, meta)


def _rank_dir(parts: Path, rank: int, world: int) -> Path:
    return parts / f"rank-{rank:05d}-of-{world:05d}"
