"""Recipes: TOML files validated by pydantic, overridable with `--set key.path=value`.

May import: errors, model.
"""

from cratemae.recipe.load import (
    apply_overrides,
    diff_recipes,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_hash,
    unsafe_changes,
)
from cratemae.recipe.schema import (
    DataSection,
    ModelSection,
    OptimSection,
    Recipe,
    RunSection,
    SchedSection,
)

__all__ = [
    "DataSection",
    "ModelSection",
    "OptimSection",
    "Recipe",
    "RunSection",
    "SchedSection",
    "apply_overrides",
    "diff_recipes",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
    "unsafe_changes",
]
