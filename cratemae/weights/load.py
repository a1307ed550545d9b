"""The one loader of weights: every command that reads a model goes through here.

What a user may call a checkpoint: a checkpoint directory, a run directory (its latest
checkpoint), or a weights file written by `write_model_weights`, `cratemae export` or
`cratemae import-authors` (the file, or the directory holding it); `resolve_checkpoint`
decides which file that is. The keys inside may be in any layout `checkpoint_filter_fn`
knows; it maps them to the model being loaded. The architecture comes from the
configuration stored with the weights, and they must fit it exactly: a mismatch is one
`BadInputError` naming the file, never a half-loaded model.

Two entry points share that path: `load_model` (the whole model for inference: export,
reconstruct, import-authors' check) and `load_encoder` (the encoder alone: the backbone of
probe and finetune, and what analyze measures).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cratemae.checkpoints import (
    check_state_dict_matches,
    read_model_weights,
    strip_wrapper_prefixes,
)
from cratemae.checkpoints.files import file_digest
from cratemae.checkpoints.layout import EMA_PREFIX, META, MODEL_FILE
from cratemae.checkpoints.load import read_model_header
from cratemae.checkpoints.resolve import resolve_checkpoint
from cratemae.checkpoints.state_dict import check_finite
from cratemae.errors import BadInputError
from cratemae.model import (
    CrateEncoder,
    CrateMAE,
    CrateMAEConfig,
    MAEViT,
    authors_to_cratemae,
    build_encoder,
    build_model,
)
from cratemae.model.pos_embed import sincos_2d
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from cratemae.recipe.schema import ModelSection

__all__ = [
    "CONFIG_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "check_fits",
    "checkpoint_digest",
    "checkpoint_filter_fn",
    "config_key",
    "has_decoder",
    "load_encoder",
    "load_model",
]

CONFIG_FILE = "config.json"  # written next to exported weights

# The authors' blocks wrap each operator in `layers.0.{0,1}` (see cratemae.model.authors).
_AUTHORS_KEY = re.compile(r"^(decoder_)?blocks\.\d+\.layers\.0\.")
_SHOW = 5


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with the facts needed to feed it images and to show them
    (`mean` and `std` for `cratemae.data.transforms.normalize` and `unnormalize`, which
    live with the data: the weights package does not import it)."""

    model: CrateMAE | MAEViT | CrateEncoder  # an encoder when the file holds no decoder
    weights_file: Path
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocessing_known: bool  # False: mean/std are ImageNet's, assumed

    @property
    def config(self) -> CrateMAEConfig:
        return self.model.config

    @property
    def encoder(self) -> CrateEncoder:
        return self.model if isinstance(self.model, CrateEncoder) else self.model.encoder

    @property
    def path(self) -> Path:
        """The checkpoint directory, or the weights file when it stands alone (for messages)."""
        file = self.weights_file
        return file.parent if file.name == MODEL_FILE else file

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as `(encoder, configuration dict)`: what probe and finetune build on and
        store with their own weights."""
        return iter((self.encoder, self.config.to_dict()))


# --- the key mapper -----------------------------------------------------------------------
def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: nn.Module, source: str = "the weights"
) -> dict[str, torch.Tensor]:
    """Map a state dict in any accepted layout to the keys of `model` (a `CrateMAE` or a
    `CrateEncoder`), as timm's `checkpoint_filter_fn` does for its models.

    Accepted layouts, in any combination:
    - a `CrateMAE`: `encoder.*`, `decoder_*`, `mask_token` (pre-training checkpoints,
      full exports); an encoder-only export is its `encoder.*` part;
    - a `CrateEncoder`: bare `patch_embed.*`, `blocks.*`, ... maybe with a `head.*`
      (fine-tuning checkpoints);
    - an average of the weights under `ema.` beside them: left out, the weights trained
      are the ones loaded;
    - `module.`/`_orig_mod.` prefixes of DistributedDataParallel and torch.compile;
    - the authors' layout (`blocks.N.layers.0.0.fn.qkv.weight`, ...; their position tables
      and unused `decoder_embed` are left out);
    - timm's `VisionTransformer` layout of an MAE ViT export: its `pos_embed` is left out
      once checked to be the fixed sin-cos table the encoder computes itself.

    For a `CrateEncoder` the encoder part is kept, and the head only if the model has one.
    Keys that fit no layout are kept, for `check_state_dict_matches` to name; a state dict
    with no encoder at all, or with authors' keys of no known kind, is a `BadInputError`
    naming `source`.
    """
    state = _canonical(state_dict, source)
    has_encoder = any(k.startswith("encoder.") for k in state)
    if not has_encoder and "patch_embed.proj.weight" not in state:
        raise BadInputError(f"{source}: holds no encoder weights (no 'encoder.*' or "
                            f"'patch_embed.*' keys): not a CRATE-MAE checkpoint")
    if isinstance(model, CrateEncoder):
        if has_encoder:  # a CrateMAE's: its encoder part
            state = {k.removeprefix("encoder."): v for k, v in state.items()
                     if k.startswith("encoder.")}
        if not model.num_classes:  # a backbone: a fine-tune's head is not part of it
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        return state
    if not has_encoder:  # a bare encoder, for a model that holds one under `encoder.`
        state = {f"encoder.{k}": v for k, v in state.items()}
    return state


def _canonical(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Keys as `CrateMAE` or `CrateEncoder` names them: no wrapper prefixes, no EMA copy,
    the authors' names translated."""
    try:
        state = strip_wrapper_prefixes(state)
    except BadInputError as err:
        raise BadInputError(f"{source}: {err}") from None
    state = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
    if any(_AUTHORS_KEY.match(k) for k in state):
        state, unknown = authors_to_cratemae(state)
        if unknown:
            shown = ", ".join(sorted(unknown)[:_SHOW]) + (", ..." if len(unknown) > _SHOW else "")
            raise BadInputError(f"{source}: {len(unknown)} key(s) in no known layout: {shown}")
    return _without_position_table(state, source)


def _without_position_table(state: dict[str, torch.Tensor], source: str
                            ) -> dict[str, torch.Tensor]:
    """Drop a stored `pos_embed` (1, 1+L, d), as timm's ViT layout holds it, after checking
    that it is the fixed sin-cos table (CLS row zero) that cratemae's encoders compute: a
    learned one would otherwise be replaced silently."""
    out = {}
    for key, value in state.items():
        if key not in ("pos_embed", "encoder.pos_embed"):
            out[key] = value
            continue
        n, d = value.shape[-2:] if value.dim() == 3 else (0, 0)
        g = math.isqrt(max(n - 1, 0))
        fits = g and g * g == n - 1 and d % 4 == 0 and n * d <= MAX_TABLE
        fixed = sincos_2d(d, g, g)[None] if fits else None
        if fixed is None or value.shape != fixed.shape or (not value.is_meta and not (
                torch.allclose(value.float(), fixed, atol=1e-5))):  # a header: shape only
            raise BadInputError(f"{source}: its position table {key} is not the fixed sin-cos "
                                "one that cratemae's encoders use; a learned table cannot load")
    return out


# --- loading ------------------------------------------------------------------------------
def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """The model the weights at `path` describe, in eval mode: a `CrateMAE` if they hold a
    decoder, else a `CrateEncoder` (with the head a fine-tune trained, if any)."""
    return _load(path, backbone=False)


def load_encoder(
    checkpoint: str | os.PathLike[str],
    model_section: ModelSection | None = None,
    *,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """The encoder of any checkpoint (no head), in eval mode on `device`.

    With a recipe's `model_section`, the image size may change (the position table is
    recomputed for the new grid); any other field it sets must agree with the checkpoint.
    The result unpacks as `encoder, config = load_encoder(...)`.
    """
    return _load(checkpoint, backbone=True, model_section=model_section, device=device)


def _load(
    path: str | os.PathLike[str],
    *,
    backbone: bool,
    model_section: ModelSection | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Resolve; check the configuration against the header; read, check the values; build,
    map the keys, check, load: the one path of every loader."""
    target = resolve_checkpoint(path)
    file = target if target.is_file() else target / MODEL_FILE
    source = str(file)
    stand_ins, stored = read_model_header(target)  # shapes only: no tensor is read
    config = _configuration(stored, model_section, source)
    check_fits(config, stand_ins, source,
               lambda c: _model_for(_canonical(stand_ins, source), c, backbone=backbone))
    weights, _ = read_model_weights(target)
    state = _canonical(weights, source)
    check_finite(state, source)  # the average under `ema.` is left out: it is never loaded
    model = _model_for(state, config, backbone=backbone)
    state = checkpoint_filter_fn(state, model, source)
    model.load_state_dict(check_state_dict_matches(model, state, source), strict=True)
    mean_std = _preprocessing(file)
    mean, std = mean_std or (IMAGENET_MEAN, IMAGENET_STD)
    return LoadedModel(model=model.to(device).eval(), weights_file=file, mean=mean, std=std,
                       preprocessing_known=mean_std is not None)


def check_fits(config: CrateMAEConfig, state: dict[str, torch.Tensor], source: str,
               build: Callable[[CrateMAEConfig], nn.Module]) -> None:
    """Refuse (BadInputError naming `source`) a configuration that the tensors `state` (in
    any layout; real tensors or the `meta` stand-ins of a header) do not fit exactly, before
    anything is built for real: the sizes first (what building on the `meta` device still
    allocates: the position tables), then every key and shape of the model `build` makes,
    built on the `meta` device (no memory). A 1 KB file whose configuration asks for width
    65,536 is refused here, not after allocating gigabytes."""
    state = _canonical(state, source)
    _check_sizes(config, state, source)
    with torch.device("meta"):
        model = build(config)
    check_state_dict_matches(model, checkpoint_filter_fn(state, model, source), source)


def _model_for(
    state: dict[str, torch.Tensor], config: CrateMAEConfig, *, backbone: bool
) -> CrateMAE | MAEViT | CrateEncoder:
    """The module the (canonical) weights go into, of the class `config.family` names."""
    if backbone:
        return build_encoder(config)
    if any(k.startswith("decoder_") or k == "mask_token" for k in state):
        return build_model(config)
    head = state.get("head.weight", state.get("encoder.head.weight"))
    return build_encoder(config, num_classes=0 if head is None else head.shape[0])


def _configuration(
    stored: dict[str, Any], model_section: ModelSection | None, source: str
) -> CrateMAEConfig:
    """The stored configuration, at the recipe's `model.img_size` if it sets one; any other
    field the recipe sets must agree with the checkpoint."""
    try:
        config = CrateMAEConfig.from_dict(stored)
    except (TypeError, ValueError) as err:
        raise BadInputError(f"{source}: bad model configuration ({err})") from None
    if model_section is None:
        return config
    current = config.to_dict()
    for key, value in model_section.config_overrides().items():
        if key != "img_size" and current.get(key) != value:
            raise BadInputError(
                f"model.{key} = {value!r}, but {source} holds a model with {key} = "
                f"{current.get(key)!r}: probe and finetune take the model from the checkpoint "
                f"(of the model section only img_size may be set)")
    if model_section.img_size is not None:
        try:
            config = dataclasses.replace(config, img_size=model_section.img_size)
        except ValueError as err:
            raise BadInputError(f"model.img_size = {model_section.img_size}: {err}") from None
    return config


def _triple(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def _preprocessing(file: Path) -> tuple[tuple, tuple] | None:
    """(mean, std) the weights were trained with: from the training recipe that a checkpoint
    directory records, or from the config.json written next to exported weights."""
    where = file.parent
    try:
        if (where / META).is_file():
            meta = json.loads((where / META).read_text(encoding="utf-8"))
            found = tomllib.loads(meta.get("recipe_toml", "")).get("data", {})
            # A recipe that does not set them used the schema's default, ImageNet's.
            found = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, **found}
        elif (where / CONFIG_FILE).is_file():  # an export: cratemae's record, or timm's
            found = json.loads((where / CONFIG_FILE).read_text(encoding="utf-8"))
            found = {**(found.get("pretrained_cfg") or {}), **found}
        else:
            return None
        mean, std = _triple(found.get("mean")), _triple(found.get("std"))
    except (OSError, ValueError, AttributeError):  # unreadable: fall back to the default
        return None
    return (mean, std) if mean and std else None


# --- finding and naming checkpoints -------------------------------------------------------
def has_decoder(weights: Path) -> bool:
    """Whether a weights file holds a decoder (read from its header alone)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = f.keys()
        return any("decoder_pred." in name for name in names)
    except Exception:  # unreadable: not a run to pick; loading it would say why
        return False


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the checkpoint's model weights file (what features computed from it
    depend on)."""
    target = resolve_checkpoint(path)
    return file_digest(target if target.is_file() else target / MODEL_FILE)["sha256"]


def config_key(**parts: object) -> str:
    """A short stable hash of JSON-able parts (for cache file names)."""
    text = json.dumps(parts, sort_keys=True, default=str, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# A 4,096-pixel square at patch 16: more patches than that is not a model anyone trains, and
# the position tables alone would take gigabytes.
MAX_PATCHES = 2**16
# Entries of a position table (1 + patches, width), computed in memory whatever the weights
# say: 512 MB of float32 (ViT-L at 448 px, patch 14, needs 1M).
MAX_TABLE = 2**27


def _check_sizes(config: CrateMAEConfig, state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a stored configuration that the tensors beside it do not bear out, before a
    model is built from it: a 300-byte file must not make a command allocate gigabytes."""
    if config.num_patches > MAX_PATCHES:
        raise BadInputError(
            f"{source}: {config.img_size} px at patch {config.patch_size} makes "
            f"{config.num_patches} patches an image, over {MAX_PATCHES}: not a model to build")
    width = max(config.embed_dim, config.decoder_embed_dim)
    if (config.num_patches + 1) * width > MAX_TABLE:
        raise BadInputError(
            f"{source}: a position table of {config.num_patches + 1} x {width} (width "
            f"{width} at {config.img_size} px, patch {config.patch_size}) is over "
            f"{MAX_TABLE} entries: not a model to build")
    proj = state.get("encoder.patch_embed.proj.weight", state.get("patch_embed.proj.weight"))
    want = [config.embed_dim, config.in_chans, config.patch_size, config.patch_size]
    if proj is not None and list(proj.shape) != want:
        raise BadInputError(f"{source}: its configuration says a patch projection of {want}, "
                            f"its weights hold {list(proj.shape)}")
    if config.family == "vit":  # widths that only MAE's ViT has: its MLP and its decoder
        d = config.embed_dim
        for key, want in (("blocks.0.mlp.fc1.weight", [int(d * config.mlp_ratio), d]),
                          ("decoder_embed.weight", [config.decoder_embed_dim, d])):
            found = state.get(key, state.get(f"encoder.{key}"))
            if found is not None and list(found.shape) != want:
                raise BadInputError(f"{source}: its configuration says {key} of {want}, its "
                                    f"weights hold {list(found.shape)}")
    for name, pattern, depth in (
            ("depth", r"^(?:encoder\.)?blocks\.(\d+)\.", config.depth),
            ("decoder_depth", r"^decoder_blocks\.(\d+)\.", config.decoder_depth)):
        found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
        if found and len(found) != depth:
            raise BadInputError(f"{source}: its configuration says {name} = {depth}, its "
                                f"weights hold {len(found)} such layers")
