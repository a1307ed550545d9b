"""The CRATE-MAE encoders as timm models: `crate_mae_{tiny,small,base,large}`.

Importing this module registers them with timm (nothing else does: `import cratemae` and
the command line never import torch or timm):

    import timm
    import cratemae.weights.timm_models  # registers crate_mae_*
    model = timm.create_model("local-dir:exported/base", pretrained=True)  # a cratemae export
    model = timm.create_model("crate_mae_base", num_classes=10, drop_path_rate=0.1)

A `cratemae export` directory is in timm's Hub layout (config.json with the architecture,
its arguments and the preprocessing; model.safetensors), so `local-dir:` (or `hf-hub:`
once uploaded) needs no other argument. A weights file may also be given directly:
`pretrained=True, pretrained_cfg_overlay=dict(file="…/model.safetensors")` with the
architecture's arguments as keywords. `checkpoint_filter_fn` keeps the encoder part of any
cratemae weights or the authors' layout, and refuses, naming the file, weights or
hyper-parameters that do not fit the model built.

MAE's ViT baselines (`mae_vit_*` presets) are not registered here: their exports name
timm's own `vit_*` architectures and are in its `VisionTransformer` layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from timm.models import build_model_with_cfg, is_model, register_model

from cratemae.model import PRESETS, CrateEncoder, CrateMAE, CrateMAEConfig
from cratemae.rundir import RunFiles
from cratemae.weights.export import pretrained_cfg

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
_DEFAULT_OUT_INDICES = 3  # features_only: the last three layers, as timm's ViT


# The CRATE-MAE presets, the ones registered here.
_CRATE_PRESETS = [n for n in PRESETS if PRESETS[n].get("family", "crate") == "crate"]
# Read by timm's `register_model` from this module (old-style: one dict per architecture).
default_cfgs = {name: pretrained_cfg(PRESETS[name]["img_size"]) for name in _CRATE_PRESETS}


def _square(img_size: int | tuple[int, int] | list[int]) -> int:
    if isinstance(img_size, int):
        return img_size
    h, w = img_size
    if h != w:
        raise ValueError(f"CRATE-MAE encoders are built for square images, got img_size "
                         f"{tuple(img_size)} (dynamic_img_size=True takes any size later)")
    return int(h)


def _build_encoder(
    *,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    dynamic_img_size: bool = True,
    img_size: int | tuple[int, int] = 224,
    **fields: Any,
) -> CrateEncoder:
    """What timm's builder instantiates: `CrateEncoder` from a preset's fields + kwargs."""
    if drop_rate:
        raise ValueError("CRATE-MAE encoders have no classifier dropout: drop_rate must be 0 "
                         "(drop_path_rate, stochastic depth, is supported)")
    # The decoder fields only have to be consistent; the encoder never reads them.
    dim, heads = fields.get("embed_dim", 768), fields.get("num_heads", 12)
    fields.update(decoder_embed_dim=dim, decoder_num_heads=heads, decoder_depth=1)
    config = CrateMAEConfig.from_dict({**fields, "img_size": _square(img_size)})
    # `CrateEncoder` alone leaves its ISTA dictionaries at PyTorch's default; the
    # autoencoder initialises every part as the authors do, so take its encoder.
    encoder = CrateMAE(config).encoder
    encoder.reset_classifier(num_classes, global_pool)
    encoder.set_drop_path_rate(drop_path_rate)
    encoder.dynamic_img_size = dynamic_img_size
    return encoder


def _real_input(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """pretrained_cfg entries for the model actually built: its input size, and whether
    that size is fixed, so `resolve_data_config` feeds it images of the right size."""
    size = kwargs.get("img_size", PRESETS[variant]["img_size"])
    h = w = size if isinstance(size, int) else None
    if h is None:
        h, w = size
    return dict(input_size=(kwargs.get("in_chans", 3), h, w),
                fixed_input_size=not kwargs.get("dynamic_img_size", True))


def _create(variant: str, pretrained: bool, **kwargs: Any) -> CrateEncoder:
    preset = {k: v for k, v in PRESETS[variant].items() if not k.startswith("decoder_")}
    kwargs = {**preset, **kwargs}
    real = _real_input(variant, kwargs)
    if not pretrained:  # no weights to describe: the config describes the model built
        real["num_classes"] = kwargs.get("num_classes", 0)
    overlay = {**real, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    out_indices = kwargs.pop("out_indices", _DEFAULT_OUT_INDICES)
    return build_model_with_cfg(
        _build_encoder, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_cfg_overlay=overlay,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs,
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
    """Register the four encoders with timm (done on import; later calls do nothing)."""
    for fn in _ENTRYPOINTS:
        if not is_model(fn.__name__):
            register_model(fn)


def _file_config(model: torch.nn.Module) -> tuple[str, dict[str, Any] | None]:
    """The weights file timm is loading, and the cratemae config stored in it, if any.
    (`local-dir:` names the directory; the file in it is model.safetensors.)"""
    file = str((getattr(model, "pretrained_cfg", None) or {}).get("file") or "the weights")
    if Path(file).is_dir():
        file = str(RunFiles(file).model)
    if not file.endswith(".safetensors") or not Path(file).is_file():
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


register_timm_models()
