"""Weights in the authors' key layout (Ma-Lab-Berkeley/CRATE, `model/crate_ae/`)."""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["AUTHORS_IGNORED_KEYS", "authors_to_cratemae", "load_authors_state_dict"]

# Their two frozen sin-cos tables (recomputed here) and their never-used `decoder_embed`.
AUTHORS_IGNORED_KEYS = re.compile(r"^(pos_embed|decoder_pos_embed|decoder_embed\.(weight|bias))$")

# (their key pattern, our key template). Inside a block, `layers.0.0` / `layers.0.1` are
# their PreNorm wrappers: `.norm` is the LayerNorm and `.fn` the wrapped operator.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t)
    for p, t in [
        (r"^patch_embed\.proj\.(weight|bias)$", r"encoder.patch_embed.proj.\1"),
        (r"^cls_token$", "encoder.cls_token"),
        (r"^norm\.(weight|bias)$", r"encoder.norm.\1"),
        (r"^blocks\.(\d+)\.layers\.0\.0\.norm\.(weight|bias)$", r"encoder.blocks.\1.norm1.\2"),
        (
            r"^blocks\.(\d+)\.layers\.0\.0\.fn\.qkv\.weight$",
            r"encoder.blocks.\1.mssa.u_proj.weight",
        ),
        (
            r"^blocks\.(\d+)\.layers\.0\.0\.fn\.to_out\.0\.(weight|bias)$",
            r"encoder.blocks.\1.mssa.out_proj.\2",
        ),
        (r"^blocks\.(\d+)\.layers\.0\.1\.norm\.(weight|bias)$", r"encoder.blocks.\1.norm2.\2"),
        (r"^blocks\.(\d+)\.layers\.0\.1\.fn\.weight$", r"encoder.blocks.\1.ista.dictionary"),
        (r"^mask_token$", "mask_token"),
        (
            r"^decoder_blocks\.(\d+)\.layers\.0\.0\.norm\.(weight|bias)$",
            r"decoder_blocks.\1.norm1.\2",
        ),
        (r"^decoder_blocks\.(\d+)\.layers\.0\.0\.fn\.weight$", r"decoder_blocks.\1.dictionary"),
        (
            r"^decoder_blocks\.(\d+)\.layers\.0\.1\.norm\.(weight|bias)$",
            r"decoder_blocks.\1.norm2.\2",
        ),
        (
            r"^decoder_blocks\.(\d+)\.layers\.0\.1\.fn\.qkv\.weight$",
            r"decoder_blocks.\1.mssa.u_proj.weight",
        ),
        (
            r"^decoder_blocks\.(\d+)\.layers\.0\.1\.fn\.to_out\.0\.(weight|bias)$",
            r"decoder_blocks.\1.mssa.out_proj.\2",
        ),
        (r"^decoder_norm\.(weight|bias)$", r"decoder_norm.\1"),
        (r"^decoder_pred\.(weight|bias)$", r"decoder_pred.\1"),
    ]
]


def authors_to_cratemae(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename their keys to ours. Returns (renamed, keys that match no rule)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if AUTHORS_IGNORED_KEYS.match(key):
            continue
        for pattern, template in _RULES:
            if pattern.match(key):
                out[pattern.sub(template, key)] = value
                break
        else:
            unknown.append(key)
    return out, unknown


def load_authors_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a state dict in the authors' layout into a `CrateMAE`, all or nothing.

    Their position tables and unused `decoder_embed` are ignored. Any other key that is
    missing, unexpected, or of the wrong shape raises `ValueError` listing them, before
    any weight is copied.
    """
    renamed, unexpected = authors_to_cratemae(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    shapes = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if k in own and v.shape != own[k].shape
    ]
    unexpected += sorted(set(renamed) - set(own))
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise ValueError("cannot load the authors' state dict: " + " | ".join(problems))
    model.load_state_dict(renamed, strict=True)
