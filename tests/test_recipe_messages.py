"""A recipe's mistakes are messages that lead somewhere: the nearest valid key, and the
place the bad value came from (the file or the `--set`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe


def test_an_unknown_key_suggests_the_nearest_valid_one(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[schedule]\nmax_step = 3\n[optim]\nepochs = 2\n[run]\nzzzz = 1\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(recipe)
    lines = str(err.value).splitlines()
    assert f"{recipe}: schedule.max_step: unknown key (did you mean schedule.max_steps?)" in lines
    assert f"{recipe}: optim.epochs: unknown key (did you mean schedule.epochs?)" in lines
    assert f"{recipe}: run.zzzz: unknown key" in lines  # nothing close: no guess


def test_a_bad_value_from_set_names_the_set_not_the_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nlr = 0.1\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(recipe, ["schedule.max_steps=0", "optim.lr=2e-4"])
    assert re.fullmatch(r"--set schedule\.max_steps=0: schedule\.max_steps: Input should be "
                        r"greater than 0 \(got 0\)", str(err.value)), str(err.value)
    recipe.write_text("[schedule]\nmax_steps = 0\n")  # from the file: the file is named
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(recipe))}: schedule\.max_steps"):
        load_recipe(recipe, ["optim.lr=2e-4"])


def test_an_unknown_section_made_by_set_names_the_set(tmp_path: Path) -> None:
    """pydantic reports `--set model.x.y.z=1` as the unknown key `model.x`: the message still
    names the `--set` that made it, not the recipe file, which holds no such key."""
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nlr = 0.1\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(recipe, ["model.x.y.z=1", "optim.lr=2e-4"])
    assert str(err.value) == "--set model.x.y.z=1: model.x: unknown key"
