"""The model computes the same function as the authors' released code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cratemae.model import CrateMAE, CrateMAEConfig, load_authors_state_dict
from cratemae.model.pos_embed import sincos_2d
from cratemae.model.reference import reference_features, reference_forward

# The authors' code's outputs on a small configuration (provenance: tests/data/REFERENCE.md),
# kept in the repository so that the check runs on any clone.
VECTORS = Path(__file__).resolve().parent / "data" / "official-crate-mae-tiny.safetensors"
ATOL = 1e-4  # absolute, float32, CPU


def _load_reference():
    if not VECTORS.is_file():
        pytest.fail(f"reference vectors not found at {VECTORS}")
    meta = json.loads(safe_open(str(VECTORS), "pt").metadata()["config"])
    tensors = load_file(str(VECTORS))
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    io = {k.removeprefix("io."): v for k, v in tensors.items() if k.startswith("io.")}
    config = CrateMAEConfig.from_dict(
        {k: v for k, v in meta.items() if k not in ("mask_ratio", "seed")}
    )
    return config, meta["mask_ratio"], state, io


@pytest.fixture(scope="module")
def authors():
    config, mask_ratio, state, io = _load_reference()
    model = CrateMAE(config).eval()
    load_authors_state_dict(model, state)
    return model, mask_ratio, state, io


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_forward_matches_authors(authors, path):
    model, mask_ratio, _, io = authors
    with torch.no_grad():
        if path == "fast":
            out = model(io["imgs"], mask_ratio=mask_ratio, noise=io["noise"])
        else:
            out = reference_forward(model, io["imgs"], mask_ratio, io["noise"])
    assert torch.equal(out.mask, io["mask"])
    torch.testing.assert_close(out.loss.reshape(1), io["loss"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pred, io["pred"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.latent, io["latent"], atol=ATOL, rtol=0)


def test_features_match_authors(authors):
    model, _, _, io = authors
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(io["imgs"]), io["features"], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            reference_features(model, io["imgs"]), io["features"], atol=ATOL, rtol=0
        )


def test_position_table_matches_authors(authors):
    model, _, state, _ = authors
    g = model.config.grid_size
    table = sincos_2d(model.config.embed_dim, g, g)[None]
    torch.testing.assert_close(table, state["decoder_pos_embed"], atol=1e-6, rtol=0)
    torch.testing.assert_close(table, state["pos_embed"], atol=1e-6, rtol=0)


def test_authors_loader_rejects_bad_keys(authors):
    model, _, state, _ = authors
    fresh = CrateMAE(model.config)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    with pytest.raises(ValueError, match=r"missing keys: encoder\.norm\.weight"):
        load_authors_state_dict(fresh, missing)
    extra = {**state, "head.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
        load_authors_state_dict(fresh, extra)
    wrong = {**state, "mask_token": torch.zeros(1, 1, 8)}
    with pytest.raises(ValueError, match=r"shape mismatches: mask_token"):
        load_authors_state_dict(fresh, wrong)
    # Nothing was copied by the failed loads.
    after = fresh.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(after["encoder.cls_token"], model.encoder.cls_token)
