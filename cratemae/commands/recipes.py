"""`cratemae recipes`: the recipes shipped with cratemae: list them, show one, copy one.

Every command that takes a recipe also takes one of these by name (`cratemae pretrain demo`),
so an installed package needs no clone; `copy` gives a file of one's own to edit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cratemae.commands import console
from cratemae.commands._cli_utils import JsonOpt
from cratemae.errors import BadInputError, CrateMAEError

__all__ = ["recipes"]

recipes = typer.Typer(name="recipes")

NameArg = Annotated[
    str,
    typer.Argument(metavar="NAME", help="A shipped recipe, as 'cratemae recipes' lists it.",
                   show_default=False),
]


@recipes.callback(invoke_without_command=True)
def list_recipes(ctx: typer.Context) -> None:
    """List the shipped recipes; show or copy one.

    Prints each recipe's name and what it is for. Any command that takes a recipe
    file takes one of these names instead (an existing file of that name wins).

    Examples:
      $ cratemae recipes
      $ cratemae recipes show probe/cifar10
      $ cratemae recipes copy base my-base.toml
      $ cratemae recipes keys schedule
      $ cratemae pretrain demo
    """
    if ctx.invoked_subcommand is not None:
        return
    from cratemae.recipe import shipped

    found = shipped.list_recipes()
    if not found:
        raise CrateMAEError(f"{shipped.PACKAGE}: no shipped recipes found (a broken install?)")
    width = max(len(r.name) for r in found)
    for recipe in found:
        typer.echo(f"{recipe.name:<{width}}  {recipe.description}".rstrip())


@recipes.command("show")
def show(name: NameArg) -> None:
    """Print a shipped recipe.

    Examples:
      $ cratemae recipes show demo
      $ cratemae recipes show finetune/in1k > in1k.toml
    """
    from cratemae.recipe import find_recipe

    typer.echo(find_recipe(name).read_text(), nl=False)


@recipes.command("copy")
def copy(
    name: NameArg,
    dest: Annotated[
        str,
        typer.Argument(
            metavar="DEST",
            help="The file to write, or a directory (an existing one, or one ending in /) to "
            "write NAME's file into.",
            show_default=False,
        ),
    ],
    force: Annotated[bool, typer.Option("--force", help="Overwrite DEST if it exists.")] = False,
) -> None:
    """Copy a shipped recipe to a file of your own, to edit and run.

    Refuses to overwrite an existing file unless --force is given.

    Examples:
      $ cratemae recipes copy base my-base.toml
      $ cratemae recipes copy probe/cifar10 recipes/ --force
    """
    from cratemae.fs import atomic_write_text
    from cratemae.recipe import find_recipe

    recipe = find_recipe(name)
    into = Path(dest).is_dir() or dest.endswith(("/", os.sep))
    target = Path(dest) / recipe.filename if into else Path(dest)
    if target.is_dir():
        raise BadInputError(f"{target}: is a directory")
    if target.exists() and not force:
        raise BadInputError(f"{target}: already exists; --force overwrites it")
    try:
        atomic_write_text(target, recipe.read_text())
    except OSError as err:
        raise BadInputError(f"{target}: cannot write: {err.strerror or err}") from None
    run = f"cratemae {recipe.command} {target}"
    if recipe.command != "pretrain":
        run += " --checkpoint CKPT"
    console.log(f"wrote {target}; edit it, then: {run}")


@recipes.command("keys")
def keys(
    prefix: Annotated[
        str,
        typer.Argument(metavar="PREFIX", help="Only the keys that start with this (a section: "
                       "'schedule', 'run.nan').", show_default=False),
    ] = "",
    json_: JsonOpt = False,
) -> None:
    """Every recipe key: its type, default and what it does.

    Read from the recipe schema itself, so it lists exactly the keys a recipe file and
    --set take. Each key is one line (key, type, default), its help the line below.

    Examples:
      $ cratemae recipes keys
      $ cratemae recipes keys schedule
      $ cratemae recipes keys --json
    """
    from dataclasses import asdict

    from cratemae.fs import strict_json
    from cratemae.recipe.keys import recipe_keys

    found = [k for k in recipe_keys() if k.path.startswith(prefix)]
    if not found:
        raise BadInputError(f"{prefix}: no recipe key starts with this")
    if json_:
        typer.echo(strict_json([asdict(k) for k in found]))
        return
    import textwrap

    def indented(text: str) -> str:
        return textwrap.fill(text, 80, initial_indent="    ", subsequent_indent="    ")

    for key in found:
        line = f"{key.path}  {key.type}  (default {key.default})"
        if len(line) > 80:  # a long choice of words: the type on lines of its own
            line = f"{key.path}  (default {key.default})\n" + indented(
                key.type.replace('"|"', '" | "'))
        typer.echo(line)
        if key.help:
            typer.echo(indented(key.help))
