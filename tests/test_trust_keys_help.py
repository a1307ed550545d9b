"""Every recipe key documents itself (`cratemae recipes keys`), and every size has an upper
bound, so that a typo is refused with its limit instead of hanging the machine while the
weights or batches are allocated."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from support import cli

from cratemae.errors import BadInputError
from cratemae.model import CrateMAEConfig
from cratemae.recipe import Recipe, load_recipe
from cratemae.recipe.keys import recipe_keys

SIZES = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
         "decoder_embed_dim", "decoder_depth", "decoder_num_heads")


def test_every_key_has_one_line_of_help() -> None:
    keys = recipe_keys(Recipe)
    missing = [k.path for k in keys if not k.help.strip()]
    assert missing == [], f"keys without help: {missing}"
    for key in keys:
        # Cut in the middle of a bracket means the sentence splitter stopped too early.
        opened = sum(key.help.count(c) for c in "([")
        assert opened == sum(key.help.count(c) for c in ")]"), (key.path, key.help)
        assert "\n" not in key.help


def test_help_says_what_the_special_values_mean() -> None:
    result = cli("recipes", "keys", "--json")
    assert result.exit_code == 0, result.output
    helps = {row["path"]: row["help"] for row in json.loads(result.stdout)}
    assert "unset: all epochs" in helps["schedule.max_steps"]
    assert "0: none" in helps["schedule.warmup_epochs"]
    assert "-1: last" in helps["probe.layer"]
    assert "per 256 images" in helps["optim.base_lr"]
    assert "He et al. 2022)" in helps["model.family"]


@pytest.mark.parametrize("name", SIZES)
def test_every_size_of_the_model_has_an_upper_bound(name: str) -> None:
    field = next(f for f in dataclasses.fields(CrateMAEConfig) if f.name == name)
    limit = field.metadata["le"]
    with pytest.raises(ValueError, match=f"{name} must be at most {limit}"):
        CrateMAEConfig(**{name: limit + 1})
    with pytest.raises(ValueError, match=f"model.{name}"):
        Recipe.model_validate({"model": {name: limit + 1}})


@pytest.mark.parametrize(("override", "key", "limit"), [
    ("model.depth=100000000", "model.depth", "1024"),
    ("data.batch_size=100000000000", "data.batch_size", "1048576"),
    ("model.embed_dim=1000000", "model.embed_dim", "65536"),
    ("data.num_workers=100000", "data.num_workers", "1024"),
    ("probe.num_classes=1000000000", "probe.num_classes", "16777216"),
])
def test_a_huge_override_is_refused_with_its_limit(override: str, key: str,
                                                   limit: str) -> None:
    with pytest.raises(BadInputError, match=rf"{key}: .*{limit}"):
        load_recipe("demo", [override])


def test_a_huge_size_in_a_file_names_the_file_key_and_limit(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.toml"
    recipe.write_text("[data]\nbatch_size = 100000000000\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(recipe)
    line = str(err.value)
    assert "\n" not in line and str(recipe) in line
    assert "data.batch_size" in line and "1048576" in line


def _no_model(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was built: the recipe check let a huge size through")


@pytest.mark.parametrize("override", ["model.depth=100000000", "data.batch_size=100000000000"])
def test_pretrain_refuses_a_huge_size_at_once(tmp_path: Path, override: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Were the bound gone, building the model would hang this machine: fail instead.
    monkeypatch.setattr("cratemae.tasks.pretrain.create_model", _no_model)
    start = time.monotonic()
    result = cli("pretrain", "demo", "--set", override, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and override.split("=")[0] in errors[0], result.output
    assert "less than or equal to" in errors[0]
    assert time.monotonic() - start < 10  # milliseconds in fact; generous on a busy machine
    assert not (tmp_path / "run").exists()


def test_too_many_patches_an_image_is_refused_before_any_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 8192 px and patch 1 each pass their own bound; together: 67M tokens an image.
    with pytest.raises(ValueError, match="67108864 patches an image, over 1048576"):
        CrateMAEConfig(img_size=8192, patch_size=1)
    monkeypatch.setattr("cratemae.model.factory.build_model", _no_model)  # checked before
    result = cli("pretrain", "demo", "--set", "model.img_size=8192", "--set",
                 "model.patch_size=1", "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "patches an image" in result.output and not (tmp_path / "run").exists()


def test_sizes_each_within_bounds_but_too_big_together_are_refused() -> None:
    """Width 65,536 at the documented bound passed every per-key check and then hung the
    machine building 300 G parameters; the whole model's size is bounded too."""
    from cratemae.model.config import MAX_PARAMS, CrateMAEConfig

    with pytest.raises(ValueError, match="parameters, over"):
        CrateMAEConfig(embed_dim=65536, num_heads=16, decoder_embed_dim=512)
    base = CrateMAEConfig()  # the paper's Base fits with room to spare
    assert base.approx_params < MAX_PARAMS / 100
