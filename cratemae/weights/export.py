"""Write weights for other tools: a directory in timm's Hub layout, or ONNX.

`cratemae export` writes DIR/model.safetensors, DIR/config.json and DIR/README.md: what
`timm.create_model("local-dir:DIR", pretrained=True)` loads with no other argument (after
`import cratemae.weights.timm_models`), and what `hf-hub:` serves once DIR is uploaded.

- model.safetensors is a cratemae weights file (keys as in `CrateMAE`, the configuration in
  its metadata), so every cratemae command reads the directory back; timm's loader maps
  the keys with the registered models' `checkpoint_filter_fn`. MAE's ViT (family "vit")
  is written as timm's own `VisionTransformer` holds it (bare encoder keys, `pos_embed`
  the fixed sin-cos table as the parameter timm expects), the encoder only, so that timm's
  `vit_*` architectures load it with no cratemae import; cratemae reads it back as well.
- config.json holds timm's fields (`architecture`, `num_classes`, `num_features`,
  `global_pool`, `model_args`, `pretrained_cfg` with the input size, mean/std, crop and
  interpolation the weights were trained with, `label_names` of a classifier when known)
  and cratemae's own record beside them (`format`, `model`, `mean`, `std`, `sha256`, ...).
- README.md is a model card: architecture, parameters, recipe, data, scores found in the
  run directory, the command that wrote it, and a licence placeholder.

The weights written are those of a model they were just loaded into, so they always fit
the configuration, and never carry `module.`/`_orig_mod.` prefixes.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cratemae.checkpoints import write_model_weights
from cratemae.checkpoints.files import file_digest
from cratemae.checkpoints.layout import META
from cratemae.checkpoints.resolve import run_dir_of
from cratemae.fs import atomic_write_json, atomic_write_text, strict_json
from cratemae.model import PRESETS, CrateEncoder, CrateMAEConfig
from cratemae.rundir import FINETUNE_FILE, PROBE_FILE, RunFiles
from cratemae.weights.load import CONFIG_FILE, IMAGENET_MEAN, IMAGENET_STD, LoadedModel

__all__ = ["ExportResult", "export_safetensors", "pretrained_cfg", "timm_call",
           "timm_vit_state", "write_config_json", "write_model_card"]

_TIMM_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                "ista_step_size", "ista_lambda")
# MAE's ViT: timm's `VisionTransformer` arguments that a configuration sets, and timm's
# architecture of each preset's shape (224 px, patch 16).
_VIT_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
               "mlp_ratio")
TIMM_VIT_NAMES = {"mae_vit_tiny": "vit_tiny_patch16_224", "mae_vit_small": "vit_small_patch16_224",
                  "mae_vit_base": "vit_base_patch16_224", "mae_vit_large": "vit_large_patch16_224"}
PAPERS = {
    "crate": ("arXiv:2404.02446",
              "Masked Completion via Structured Diffusion with White-Box Transformers"),
    "vit": ("arXiv:2111.06377", "Masked Autoencoders Are Scalable Vision Learners"),
}
CARD_FILE = "README.md"
SCORE_FILES = (FINETUNE_FILE, PROBE_FILE)
# The evaluation resize is the short side to img_size * 256/224, then a centre crop.
CROP_PCT = 224 / 256


@dataclass(frozen=True)
class ExportResult:
    """The files written, the weights' SHA-256, and whether they are the encoder's only."""

    file: Path
    sha256: str
    config_file: Path
    encoder_only: bool
    card_file: Path | None = None


def pretrained_cfg(
    img_size: int,
    *,
    in_chans: int = 3,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    num_classes: int = 0,
    family: str = "crate",
) -> dict[str, Any]:
    """timm's pretrained config for weights trained at `img_size` with `mean`/`std`: what
    `resolve_data_config({}, model=m)` turns into the transform. No download location.
    timm's ViT takes its training size only (`fixed_input_size`); CRATE encoders any."""
    paper_id, paper_name = PAPERS[family]
    return dict(
        url="", num_classes=num_classes, input_size=(in_chans, img_size, img_size),
        fixed_input_size=family == "vit", interpolation="bicubic", crop_pct=CROP_PCT,
        mean=tuple(mean), std=tuple(std), first_conv="patch_embed.proj", classifier="head",
        license="mit", paper_ids=paper_id, paper_name=paper_name,
    )


def timm_call(config: CrateMAEConfig) -> dict[str, Any]:
    """The registered timm model for an encoder and the keyword arguments that make
    `timm.create_model` build exactly it: the preset of the nearest width, and every field
    that differs from that preset. For MAE's ViT, timm's own `vit_*` of that preset."""
    fields = config.to_dict()
    preset_name = _nearest_preset(config)
    preset = {**CrateMAEConfig().to_dict(), **PRESETS[preset_name]}
    kwargs = {k: fields[k] for k in _fields(config) if fields[k] != preset[k]}
    return {"model_name": _architecture(config), "kwargs": kwargs}


def _fields(config: CrateMAEConfig) -> tuple[str, ...]:
    return _VIT_FIELDS if config.family == "vit" else _TIMM_FIELDS


def _nearest_preset(config: CrateMAEConfig) -> str:
    """The preset of the same family and the nearest width."""
    same = [n for n in PRESETS if PRESETS[n].get("family", "crate") == config.family]
    return min(same, key=lambda n: abs(PRESETS[n]["embed_dim"] - config.embed_dim))


def _architecture(config: CrateMAEConfig) -> str:
    """The name timm registers for the nearest preset (`model_args` do the rest): the
    `crate_mae_*` preset itself, or timm's `vit_*` of a `mae_vit_*` preset's shape."""
    name = _nearest_preset(config)
    return TIMM_VIT_NAMES[name] if config.family == "vit" else name


def _model_args(config: CrateMAEConfig, pool: str) -> dict[str, Any]:
    """`model_args` of config.json: what timm builds the architecture with."""
    fields = config.to_dict()
    args = {k: fields[k] for k in _fields(config)}
    if config.family == "vit":
        # The final norm stays in forward_features whatever the pooling, as in
        # `ViTEncoder` (timm would otherwise move it after an "avg" pool).
        args.update(class_token=True, fc_norm=False)
    return {**args, "global_pool": pool}


def timm_vit_state(encoder: CrateEncoder) -> dict[str, torch.Tensor]:
    """A `ViTEncoder`'s weights as timm's `VisionTransformer` names them: its own keys
    (patch_embed, cls_token, blocks, norm, head already are timm's) and `pos_embed`, the
    fixed sin-cos table (1, 1+L, d), as the parameter timm expects."""
    return {**encoder.state_dict(), "pos_embed": encoder.pos_embed.detach().clone()}


def _timm_entry(loaded: LoadedModel) -> dict[str, Any]:
    entry = timm_call(loaded.config)
    classes = loaded.encoder.num_classes
    if classes:  # timm keeps a stored head only if the overlay says the file has one
        entry["num_classes"] = classes
        entry["note"] = ("keep the fine-tuned head: pretrained_cfg_overlay=dict(file=..., "
                         f"num_classes={classes}), num_classes={classes}")
    return entry


def _hub_fields(loaded: LoadedModel, label_names: list[str] | None,
                global_pool: str | None) -> dict[str, Any]:
    """timm's Hub config: what `local-dir:`/`hf-hub:` build the model from. `global_pool`:
    the pooling a classifier's head was trained on (weights files do not record it)."""
    config, encoder = loaded.config, loaded.encoder
    pool = global_pool if encoder.num_classes and global_pool else encoder.global_pool
    cfg = pretrained_cfg(config.img_size, in_chans=config.in_chans, mean=loaded.mean,
                         std=loaded.std, num_classes=encoder.num_classes, family=config.family)
    hub: dict[str, Any] = {
        "architecture": _architecture(config),
        "num_classes": encoder.num_classes,
        "num_features": encoder.num_features,
        "global_pool": pool,
        "model_args": _model_args(config, pool),
        "pretrained_cfg": cfg,
    }
    if label_names and len(label_names) == encoder.num_classes:
        hub["label_names"] = list(label_names)
    return hub


def write_config_json(
    out_dir: Path, loaded: LoadedModel, *, file: Path, sha256: str, extra: dict[str, Any],
    label_names: list[str] | None = None, global_pool: str | None = None,
) -> Path:
    """`config.json`: timm's Hub fields, then cratemae's record (model configuration,
    preprocessing, provenance, the timm call for a weights file given directly)."""
    record = {
        **_hub_fields(loaded, label_names, global_pool),
        "format": "cratemae",
        "file": file.name,
        "sha256": sha256,
        "model": loaded.config.to_dict(),
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "preprocessing_known": loaded.preprocessing_known,
        "source": str(loaded.weights_file),
        "timm": _timm_entry(loaded),
        **extra,
    }
    path = out_dir / CONFIG_FILE
    atomic_write_json(path, record, indent=2)
    return path


# --- the model card -------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_records(weights_file: Path) -> dict[str, Any]:
    """What the run directory says about the weights: scores (finetune.json, probe.json),
    the recipe (meta.json of the checkpoint) and the head's pooling in it, class names if a
    record holds them."""
    found: dict[str, Any] = {"scores": {}, "recipe_toml": None, "label_names": None}
    run_dir = run_dir_of(weights_file)
    for where in dict.fromkeys([weights_file.parent] + ([run_dir] if run_dir else [])):
        for name in SCORE_FILES:
            record = _read_json(where / name) if name not in found["scores"] else None
            if record is not None:
                found["scores"][name] = record
                names = record.get("class_names") or record.get("label_names")
                if isinstance(names, list) and found["label_names"] is None:
                    found["label_names"] = [str(n) for n in names]
        meta = _read_json(where / META) if found["recipe_toml"] is None else None
        if meta is not None and isinstance(meta.get("recipe_toml"), str):
            found["recipe_toml"] = meta["recipe_toml"]
    found["global_pool"] = _recipe(found["recipe_toml"]).get("finetune", {}).get("pool")
    return found


def _recipe(recipe_toml: str | None) -> dict[str, Any]:
    try:
        return tomllib.loads(recipe_toml or "")
    except tomllib.TOMLDecodeError:
        return {}


def _data_lines(recipe_toml: str | None) -> list[str]:
    data = _recipe(recipe_toml).get("data", {})
    return [f"- {k}: `{data[k]}`" for k in ("train", "val", "mean", "std") if k in data]


# Per family: the model's name in the title, what it is, and the import timm needs first.
_ABOUT = {
    "crate": ("CRATE-MAE",
              "White-box CRATE encoder (MSSA + ISTA layers) pre-trained as a masked autoencoder "
              "with [cratemae](https://github.com/) (Pai et al., ICLR 2024, arXiv:2404.02446).",
              ["import cratemae.weights.timm_models  # registers the crate_mae_* models", ""]),
    "vit": ("MAE ViT",
            "ViT encoder (timm's VisionTransformer: attention + MLP blocks, fixed sin-cos "
            "positions) pre-trained as a masked autoencoder (He et al., CVPR 2022, "
            "arXiv:2111.06377) with [cratemae](https://github.com/), as the baseline of "
            "CRATE-MAE. The file holds the encoder in timm's own layout: timm loads it "
            "without cratemae.", [""]),
}


def model_card(loaded: LoadedModel, records: dict[str, Any], command: str,
               file_params: int | None = None) -> str:
    """README.md in the Hugging Face model card format (YAML front matter, then text).
    `file_params`: the number of values in the weights file (default: the whole model's)."""
    config, encoder = loaded.config, loaded.encoder
    name = _architecture(config)
    family, about, imports = _ABOUT[config.family]
    params = file_params or sum(p.numel() for p in loaded.model.parameters())
    enc_params = sum(p.numel() for p in encoder.parameters())
    what = "an image classifier" if encoder.num_classes else "an image encoder"
    mlp = f", MLP ratio {config.mlp_ratio:g}" if config.family == "vit" else ""
    lines = [
        "---", "tags:", "- image-classification", "- timm", "- cratemae",
        "library_name: timm", "license: other  # TODO: choose the licence of these weights",
        "---", f"# {name} ({family}), {what}", "", about, "",
        "## Model details", "",
        f"- Architecture: `{name}`: width {config.embed_dim}, {config.depth} layers, "
        f"{config.num_heads} heads{mlp}, patch {config.patch_size}, {config.img_size} px",
        f"- Parameters: {params:,} in the file ({enc_params:,} in the encoder)",
        f"- Classes: {encoder.num_classes or 'none (features)'}; pooling "
        f"`{records.get('global_pool') or encoder.global_pool}`",
        f"- Preprocessing: resize to {config.img_size / CROP_PCT:.0f} px, centre crop "
        f"{config.img_size} px (bicubic), mean {list(loaded.mean)}, std {list(loaded.std)}"
        + ("" if loaded.preprocessing_known else " (assumed: ImageNet's)"),
        "", "## Usage", "", "```python", "import timm", *imports,
        'model = timm.create_model("local-dir:PATH", pretrained=True).eval()  '
        '# or "hf-hub:USER/REPO"',
        "cfg = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**cfg)", "```", "",
        "## Training", "",
    ]
    lines += _data_lines(records.get("recipe_toml")) or ["- data: not recorded"]
    if records.get("recipe_toml"):
        lines += ["", "<details><summary>Recipe</summary>", "", "```toml",
                  records["recipe_toml"].rstrip(), "```", "", "</details>"]
    lines += ["", "## Scores", ""]
    scores = records.get("scores") or {}
    lines += [f"- {n}: `{strict_json(s)}`" for n, s in scores.items()] or [
        "- none found in the run directory"]
    lines += ["", "## Provenance", "", f"- Weights from: `{loaded.weights_file}`",
              f"- Written by: `{command}`", "",
              "## Licence", "", "TODO: state the licence of these weights and of the data "
              "they were trained on.", ""]
    return "\n".join(lines)


def write_model_card(out_dir: Path, loaded: LoadedModel, records: dict[str, Any],
                     command: str | None = None, file_params: int | None = None) -> Path:
    path = out_dir / CARD_FILE
    command = command or shlex.join(["cratemae", *sys.argv[1:]])
    atomic_write_text(path, model_card(loaded, records, command, file_params))
    return path


def export_safetensors(
    loaded: LoadedModel, out_dir: str | os.PathLike[str], *, encoder_only: bool,
    command: str | None = None,
) -> ExportResult:
    """Write `out_dir/model.safetensors` (the whole model, or the encoder's `encoder.*`
    weights only), `out_dir/config.json` and the model card `out_dir/README.md`.

    MAE's ViT is always written encoder-only, in timm's `VisionTransformer` layout
    (`timm_vit_state`): timm's ViT has no decoder, and loads strictly what it is given."""
    out = Path(out_dir)
    state = loaded.model.state_dict()  # (name -> tensor), exactly the model's keys
    if loaded.config.family == "vit":
        state = timm_vit_state(loaded.encoder)
    elif isinstance(loaded.model, CrateEncoder):
        state = {f"encoder.{k}": v for k, v in state.items()}
    elif encoder_only:
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    file = write_model_weights(RunFiles(out).model, state, loaded.config.to_dict())
    digest = file_digest(file)["sha256"]
    encoder_only = (encoder_only or isinstance(loaded.model, CrateEncoder)
                    or loaded.config.family == "vit")
    records = run_records(loaded.weights_file)
    config_file = write_config_json(out, loaded, file=file, sha256=digest,
                                    extra={"encoder_only": encoder_only},
                                    label_names=records["label_names"],
                                    global_pool=records["global_pool"])
    card = write_model_card(out, loaded, records, command,
                            file_params=sum(v.numel() for v in state.values()))
    return ExportResult(file=file, sha256=digest, config_file=config_file,
                        encoder_only=encoder_only, card_file=card)
