"""The CRATE-MAE encoders as timm models: `crate_mae_{tiny,small,base,large}`.

    import cratemae, timm
    model = timm.create_model(
        "crate_mae_base", pretrained=True, num_classes=10,
        pretrained_cfg_overlay=dict(file="exported/base/model.safetensors"),
    )

`cratemae/__init__.py` calls `register_timm_models()` once timm is imported. The weights
file may be a `cratemae export` (full or `--encoder-only`), any cratemae weights file, or a
state dict in the authors' key layout; `checkpoint_filter_fn` keeps the encoder part and
refuses, naming the file, weights or hyper-parameters that do not fit the model built.
Architecture arguments other than the preset's are given as keyword arguments
(`img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4`).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from cratemae.model import PRESETS, CrateEncoder, CrateMAE, CrateMAEConfig
from cratemae.recipe.schema import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "checkpoint_filter_fn",
    "crate_mae_base",
    "crate_mae_large",
    "crate_mae_small",
    "crate_mae_tiny",
    "register_timm_models",
]

# Fields to compare with the file's record. num_heads and the ISTA constants change the
# function but no tensor shape, so a mismatch would otherwise load silently. (in_chans is
# left to timm, which adapts the patch projection to another channel count.)
_CHECKED_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "ista_step_size",
                   "ista_lambda")


def _cfg(variant: str) -> dict[str, Any]:
    """timm's pretrained config: no download location (weights come from a file given in
    `pretrained_cfg_overlay`), no classifier in the weights, the authors' preprocessing."""
    size = PRESETS[variant]["img_size"]
    return dict(
        url="", num_classes=0, input_size=(3, size, size), fixed_input_size=False,
        interpolation="bicubic", crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        first_conv="patch_embed.proj", classifier="head", license="mit",
        paper_ids="arXiv:2404.02446",
        paper_name="Masked Completion via Structured Diffusion with White-Box Transformers",
    )


# Read by timm's `register_model` from this module (old-style: one dict per architecture).
default_cfgs = {name: _cfg(name) for name in PRESETS}


def _build_encoder(
    *,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    img_size: int | tuple[int, int] = 224,
    **fields: Any,
) -> CrateEncoder:
    """What timm's builder instantiates: `CrateEncoder` from a preset's fields + kwargs."""
    if drop_rate or drop_path_rate:
        raise ValueError("CRATE-MAE encoders have no dropout: drop_rate/drop_path_rate must be 0")
    if not isinstance(img_size, int):
        h, w = img_size
        if h != w:
            raise ValueError(f"CRATE-MAE encoders take square images, got img_size {img_size}")
        img_size = h
    # The decoder fields only have to be consistent; the encoder never reads them.
    dim, heads = fields.get("embed_dim", 768), fields.get("num_heads", 12)
    fields.update(decoder_embed_dim=dim, decoder_num_heads=heads, decoder_depth=1)
    config = CrateMAEConfig.from_dict({**fields, "img_size": img_size})
    # `CrateEncoder` alone leaves its ISTA dictionaries uninitialised (torch.empty); the
    # autoencoder initialises every part as the authors do, so take its encoder.
    encoder = CrateMAE(config).encoder
    encoder.reset_classifier(num_classes, global_pool)
    return encoder


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CrateEncoder:
    from timm.models import build_model_with_cfg

    preset = {k: v for k, v in PRESETS[variant].items() if not k.startswith("decoder_")}
    return build_model_with_cfg(
        _build_encoder, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        **{**preset, **kwargs},
    )


def crate_mae_tiny(pretrained: bool = False, **kwargs: Any) -> CrateEncoder:
    """CRATE-MAE-Tiny encoder: width 384, 6 heads, 12 layers, patch 16, 224 px."""
    return _create("crate_mae_tiny", pretrained, **kwargs)


def crate_mae_small(pretrained: bool = False, **kwargs: Any) -> CrateEncoder:
    """CRATE-MAE-Small encoder: width 576, 12 heads, 12 layers, patch 16, 224 px."""
    return _create("crate_mae_small", pretrained, **kwargs)


def crate_mae_base(pretrained: bool = False, **kwargs: Any) -> CrateEncoder:
    """CRATE-MAE-Base encoder: width 768, 12 heads, 12 layers, patch 16, 224 px."""
    return _create("crate_mae_base", pretrained, **kwargs)


def crate_mae_large(pretrained: bool = False, **kwargs: Any) -> CrateEncoder:
    """CRATE-MAE-Large encoder: width 1024, 16 heads, 24 layers, patch 16, 224 px."""
    return _create("crate_mae_large", pretrained, **kwargs)


_ENTRYPOINTS = (crate_mae_tiny, crate_mae_small, crate_mae_base, crate_mae_large)


def register_timm_models() -> None:
    """Register the four encoders with timm (once; later calls do nothing)."""
    from timm.models import is_model, register_model

    for fn in _ENTRYPOINTS:
        if not is_model(fn.__name__):
            register_model(fn)


def _file_config(model: torch.nn.Module) -> tuple[str, dict[str, Any] | None]:
    """The weights file timm is loading, and the cratemae config stored in it, if any."""
    file = str((getattr(model, "pretrained_cfg", None) or {}).get("file") or "the weights")
    if not file.endswith(".safetensors"):
        return file, None
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        raw = (f.metadata() or {}).get("config")
    return file, json.loads(raw) if raw else None


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: CrateEncoder
) -> dict[str, torch.Tensor]:
    """timm's hook between reading a weights file and loading it into `model`.

    timm loads non-strictly when it drops a classifier, so every check happens here: the
    result holds exactly the model's weights (a classification head aside), and a file that
    records a configuration must agree with the model's hyper-parameters.
    """
    from cratemae.errors import BadInputError
    from cratemae.weights.load import checkpoint_filter_fn as to_model_keys

    file, config = _file_config(model)
    try:
        state = to_model_keys(state_dict, model, file)  # the one key mapper of every loader
    except BadInputError as err:
        raise ValueError(str(err)) from None
    if config is not None:
        ours = model.config.to_dict()
        differ = [f"{k}={config[k]!r} (model {ours[k]!r})" for k in _CHECKED_FIELDS
                  if k in config and config[k] != ours[k]]
        if differ:
            raise ValueError(f"{file}: weights were saved with {', '.join(differ)}; "
                             "pass the file's values as keyword arguments")
    expected = {k for k in model.state_dict() if not k.startswith("head.")}
    missing = sorted(expected - set(state))
    unexpected = sorted(k for k in set(state) - expected if not k.startswith("head."))
    if missing or unexpected:
        raise ValueError(f"{file}: does not fit {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return state
