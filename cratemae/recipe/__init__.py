"""Recipes: TOML files validated by pydantic, overridable with `--set key.path=value`; the
shipped ones (`recipes/` in a clone, `cratemae.recipes` when installed) are found by name.

May import: errors, guard, model.
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
from cratemae.recipe.shipped import ShippedRecipe, find_recipe, list_recipes, resolve_recipe

__all__ = [
    "DataSection",
    "ModelSection",
    "OptimSection",
    "Recipe",
    "RunSection",
    "SchedSection",
    "ShippedRecipe",
    "apply_overrides",
    "diff_recipes",
    "dump_recipe",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
    "resolve_recipe",
    "unsafe_changes",
]
