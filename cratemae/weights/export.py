"""Write weights for other tools: `model.safetensors` + `config.json`, or ONNX.

`model.safetensors` is a cratemae weights file (keys as in `CrateMAE`, the configuration in
its metadata), so every cratemae command reads it back; timm reads it through the
registered `crate_mae_*` models. `config.json` repeats the configuration for people and
other tools, with the preprocessing the weights expect and the timm call that loads them.
The weights written are those of a model they were just loaded into, so they always fit
the configuration, and never carry `module.`/`_orig_mod.` prefixes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cratemae.checkpoints import write_model_weights
from cratemae.checkpoints.files import file_digest
from cratemae.fs import atomic_write_json
from cratemae.model import PRESETS, CrateEncoder, CrateMAEConfig
from cratemae.weights.load import CONFIG_FILE, LoadedModel

__all__ = ["ExportResult", "export_safetensors", "timm_call", "write_config_json"]

_TIMM_FIELDS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                "ista_step_size", "ista_lambda")


@dataclass(frozen=True)
class ExportResult:
    """The files written, the weights' SHA-256, and whether they are the encoder's only."""

    file: Path
    sha256: str
    config_file: Path
    encoder_only: bool


def timm_call(config: CrateMAEConfig) -> dict[str, Any]:
    """The registered timm model for an encoder and the keyword arguments that make
    `timm.create_model` build exactly it: the preset of the same width (else base), and
    every field that differs from that preset."""
    fields = config.to_dict()
    name = next((n for n, p in PRESETS.items() if p["embed_dim"] == config.embed_dim),
                "crate_mae_base")
    preset = {**CrateMAEConfig().to_dict(), **PRESETS[name]}
    kwargs = {k: fields[k] for k in _TIMM_FIELDS if fields[k] != preset[k]}
    return {"model_name": name, "kwargs": kwargs}


def _timm_entry(loaded: LoadedModel) -> dict[str, Any]:
    entry = timm_call(loaded.config)
    classes = loaded.encoder.num_classes
    if classes:  # timm keeps a stored head only if the overlay says the file has one
        entry["num_classes"] = classes
        entry["note"] = ("keep the fine-tuned head: pretrained_cfg_overlay=dict(file=..., "
                         f"num_classes={classes}), num_classes={classes}")
    return entry


def write_config_json(
    out_dir: Path, loaded: LoadedModel, *, file: Path, sha256: str, extra: dict[str, Any]
) -> Path:
    """`config.json`: model configuration, preprocessing, provenance, timm call."""
    record = {
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


def export_safetensors(
    loaded: LoadedModel, out_dir: str | os.PathLike[str], *, encoder_only: bool
) -> ExportResult:
    """Write `out_dir/model.safetensors` (the whole model, or the encoder's `encoder.*`
    weights only) and `out_dir/config.json`."""
    out = Path(out_dir)
    state = loaded.model.state_dict()  # (name -> tensor), exactly the model's keys
    if isinstance(loaded.model, CrateEncoder):
        state = {f"encoder.{k}": v for k, v in state.items()}
    elif encoder_only:
        state = {k: v for k, v in state.items() if k.startswith("encoder.")}
    file = write_model_weights(out / "model.safetensors", state, loaded.config.to_dict())
    digest = file_digest(file)["sha256"]
    encoder_only = encoder_only or isinstance(loaded.model, CrateEncoder)
    config_file = write_config_json(out, loaded, file=file, sha256=digest,
                                    extra={"encoder_only": encoder_only})
    return ExportResult(file=file, sha256=digest, config_file=config_file,
                        encoder_only=encoder_only)
