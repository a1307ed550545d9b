"""`cratemae recipes keys` lists every leaf key of the recipe schema, with its type and
default: walked here independently, so a key the reference leaves out turns this red."""

from __future__ import annotations

import json

from pydantic import BaseModel
from support import cli

from cratemae.recipe import Recipe


def leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= leaf_keys(sub, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_recipes_keys_lists_every_leaf_key_of_the_schema():
    result = cli("recipes", "keys", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows].count("schedule.max_steps") == 1
    assert {r["path"] for r in rows} == leaf_keys(Recipe) and len(rows) == len(leaf_keys(Recipe))
    by_path = {r["path"]: r for r in rows}
    assert by_path["schedule.max_steps"]["type"] == "int > 0 | None"
    assert by_path["run.nan_patience"]["default"] == "20"
    assert by_path["probe.pool"]["type"] == '"token"|"avg"'


def test_the_text_reference_is_findable_by_section_and_fits_80_columns():
    result = cli("recipes", "keys", "schedule")
    assert result.exit_code == 0
    assert "schedule.max_steps  int > 0 | None  (default -)" in result.stdout
    assert "run." not in result.stdout
    assert cli("recipes", "keys", "no_such").exit_code == 2
    whole = cli("recipes", "keys").stdout.splitlines()
    assert [line for line in whole if len(line) > 80] == []
