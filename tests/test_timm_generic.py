"""timm's own generic model tests (tests/timm_generic.py, transcribed from timm's
tests/test_models.py), every one that timm runs on its ViTs: on the four registered presets
at timm's sizes (slow: the Large preset is 24 layers of width 1024 on two cores), and on a
tiny model of the same architecture (quick)."""

from __future__ import annotations

import pytest
import torch

import cratemae.weights.timm_models  # noqa: F401  (registers crate_mae_*)

pytest.importorskip("torchvision")  # timm's fx tests trace through torchvision's extractor
from timm_generic import TESTS

PRESETS = ["crate_mae_tiny", "crate_mae_small", "crate_mae_base", "crate_mae_large"]
# Three layers: timm asks for at least three feature levels.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=3)


@pytest.mark.parametrize("test", sorted(TESTS))
def test_timms_generic_tests_pass_on_a_tiny_encoder(test: str) -> None:
    torch.manual_seed(0)
    TESTS[test]("crate_mae_tiny", **TINY)


@pytest.mark.slow
@pytest.mark.parametrize("test", sorted(TESTS))
@pytest.mark.parametrize("name", PRESETS)
def test_timms_generic_tests_pass_on_every_preset(name: str, test: str) -> None:
    torch.manual_seed(0)
    TESTS[test](name)
