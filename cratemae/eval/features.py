"""Frozen-encoder features of a whole split, extracted once over all ranks and cached.

Each rank encodes its share of the split (evaluation transform: resize + centre crop, no
mask); the shares are gathered into data-set order on every rank, so the result does not
depend on the number of ranks. Rank 0 writes them as one safetensors file named by a hash
of everything they depend on (the checkpoint's weights, the data, the image size and
normalisation, the layer, the pooling and the precision); a later run with the same key
reads the file instead of the images.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cratemae.data.cache import cache_dir
from cratemae.distributed import dist
from cratemae.distributed.precision import Precision
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE, CrateMAEError
from cratemae.eval.classify import Progress, eval_batches
from cratemae.fs import atomic_path
from cratemae.model import CrateEncoder
from cratemae.recipe.schema import DataSection

__all__ = ["FeatureSet", "FeatureSpec", "cached_features", "extract_features"]

log = logging.getLogger("cratemae")
CACHE_FORMAT = "cratemae-features/1"


@dataclass(frozen=True)
class FeatureSpec:
    """How features are taken: encoder layer (after the final norm), pooling, precision."""

    layer: int
    pool: str  # "token" | "avg"
    img_size: int
    precision: Precision


@dataclass(frozen=True)
class FeatureSet:
    features: torch.Tensor  # (N, d) float32, data-set order
    labels: torch.Tensor  # (N,) int64
    from_cache: bool = False


@torch.no_grad()
def _encode(encoder: CrateEncoder, images: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """(B, C, H, W) -> (B, d) float32."""
    with spec.precision.autocast():
        tokens = encoder.layer_tokens(images, [spec.layer], norm=True)[0]  # (B, 1+L, d)
    pooled = tokens[:, 1:].mean(dim=1) if spec.pool == "avg" else tokens[:, 0]
    return pooled.float()


def extract_features(encoder: CrateEncoder, data: DataSection, split: str, spec: FeatureSpec,
                     progress: Progress | None = None) -> FeatureSet:
    """Features and labels of every sample of `split`, the same on every rank; a stop
    signal (SIGTERM, SIGUSR1) ends it at the next batch, exit 3."""
    device = dist.get_dist_info().device
    encoder.eval().to(device)
    feats, labels, positions = [], [], []
    with PreemptionFlag() as stop:  # every rank yields as many batches: agreed at each
        for batch, pos in eval_batches(data, split, spec.img_size, progress):
            if dist.all_reduce_any(stop.requested):
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                raise CrateMAEError(f"stopped by {name} while extracting the features of "
                                    f"data.{split}; run the same command again",
                                    exit_code=EXIT_REQUEUE)
            feats.append(_encode(encoder, batch.model_input(device), spec).cpu())
            labels.append(batch.labels.cpu())
            positions.append(pos)
    local = (torch.cat(positions), torch.cat(feats), torch.cat(labels))
    gathered = [dist.all_gather_tensors(t.to(dist.comm_device())) for t in local]
    pos, f, y = (torch.cat(parts).cpu() for parts in gathered)
    total = int(pos.max()) + 1
    out_f = torch.empty(total, f.shape[1], dtype=torch.float32)
    out_y = torch.full((total,), -1, dtype=torch.int64)
    out_f[pos], out_y[pos] = f, y  # a repeated sample writes the same values twice
    if (out_y < 0).any():
        raise RuntimeError(f"data.{split}: some samples were read by no rank")
    return FeatureSet(_finite(out_f, split), out_y)


def _finite(features: torch.Tensor, split: str) -> torch.Tensor:
    """`features` (N, d), or CrateMAEError naming the first sample whose row is not finite:
    a probe fitted or scored on them would report a chance-level score as a result."""
    bad = ~torch.isfinite(features).all(dim=1)
    if bool(bad.any()):
        raise CrateMAEError(f"data.{split}: sample {int(bad.nonzero()[0])} (of {len(bad)}) gave "
                            "non-finite features (inf or NaN: the weights overflow at this "
                            "precision, or hold NaN); nothing fitted or scored")
    return features


def _cache_file(root: str | None, key: str, split: str) -> Path:
    base = Path(root).expanduser() if root else cache_dir() / "features"
    return base / f"{key}-{split}.safetensors"


def cached_features(encoder: CrateEncoder, data: DataSection, split: str, spec: FeatureSpec,
                    *, key: str, root: str | None,
                    progress: Progress | None = None) -> FeatureSet:
    """`extract_features`, or the cached result under `key`. Every rank must have the file
    to use it (so a cache on a node-local disk simply means extracting again)."""
    path = _cache_file(root, key, split)
    tensors = None
    if path.is_file():
        try:
            tensors = load_file(path)
            if not {"features", "labels"} <= tensors.keys():
                raise KeyError("features/labels missing")
        except (OSError, KeyError, RuntimeError, ValueError) as err:
            log.warning("unreadable feature cache %s (%s): extracting again", path, err)
            tensors = None
    if not dist.all_reduce_any(tensors is None):
        assert tensors is not None
        log.info("data.%s: %d features from cache %s", split, tensors["labels"].numel(), path)
        return FeatureSet(_finite(tensors["features"], split), tensors["labels"],
                          from_cache=True)
    log.info("data.%s: extracting features", split)
    result = extract_features(encoder, data, split, spec, progress)
    if dist.is_main_process():
        _write(path, result, key)
    dist.barrier()
    return result


def _write(path: Path, result: FeatureSet, key: str) -> None:
    """Write atomically: readers on other ranks or in later runs see all of the file or none."""
    with atomic_path(path) as tmp:
        save_file({"features": result.features.contiguous(), "labels": result.labels},
                  str(tmp), metadata={"format": CACHE_FORMAT, "key": key})
    log.info("features cached in %s", path)
