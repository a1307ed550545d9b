"""The recipe's model section is the model's configuration: the same keys, the same bounds."""

from __future__ import annotations

import dataclasses

import pytest

from cratemae.model import CrateMAEConfig
from cratemae.recipe import ModelSection, Recipe


def test_model_section_keys_are_the_configuration_fields() -> None:
    fields = [f.name for f in dataclasses.fields(CrateMAEConfig)]
    assert list(ModelSection.model_fields) == ["name", *fields, "mask_ratio"]


@pytest.mark.parametrize(("key", "value"), [("depth", 0), ("patch_size", -2),
                                            ("ista_step_size", 0.0), ("ista_lambda", -0.1)])
def test_model_section_bounds_come_from_the_configuration(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        CrateMAEConfig(**{key: value})
    with pytest.raises(ValueError, match=f"model.{key}"):
        Recipe.model_validate({"model": {key: value}})


def test_configuration_refuses_non_finite_values() -> None:
    with pytest.raises(ValueError, match="ista_lambda must be finite"):
        CrateMAEConfig(ista_lambda=float("inf"))
