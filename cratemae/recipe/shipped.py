"""The recipes shipped with cratemae, found by name: `demo`, `probe/cifar10`, `finetune/in1k`.

They are the repository's top-level `recipes/` folder, installed as the package
`cratemae.recipes`, so a clone, an editable install and an installed wheel read the same
files. A recipe argument that is an existing file is that file, always; anything else is
looked up here by name, so that someone who installed the package without cloning it can
still run `cratemae pretrain demo`. A name is the file's path under `recipes/` without
`.toml`; the suffix may be given too.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from cratemae.errors import BadInputError
from cratemae.guard import regular_file, special_kind

__all__ = [
    "PACKAGE",
    "ShippedRecipe",
    "describe",
    "find_recipe",
    "list_recipes",
    "resolve_recipe",
]

PACKAGE = "cratemae.recipes"
SUFFIX = ".toml"


@dataclass(frozen=True)
class ShippedRecipe:
    """One shipped recipe: its name (`probe/cifar10`) and the file it is read from."""

    name: str
    resource: Traversable

    @property
    def filename(self) -> str:
        """The file's own name (`cifar10.toml`), for a copy into a directory."""
        return self.resource.name

    @property
    def command(self) -> str:
        """The command that runs it: pre-training recipes lie at the top, the others in
        a folder named after their command (`probe/`, `finetune/`)."""
        return self.name.split("/")[0] if "/" in self.name else "pretrain"

    def read_text(self) -> str:
        return self.resource.read_text(encoding="utf-8")

    @property
    def description(self) -> str:
        return describe(self.read_text())


def describe(text: str) -> str:
    """A recipe's one-line description: its first comment line, without `#` and a final
    colon (which introduces the details on the next lines). Empty if it starts with none."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            return line.lstrip("#").strip().removesuffix(":").rstrip()
        if line:
            break
    return ""


def _root() -> Traversable | None:
    try:
        return resources.files(PACKAGE)
    except ModuleNotFoundError:  # a source tree used without installing it
        return None


def list_recipes() -> list[ShippedRecipe]:
    """Every shipped recipe: the pre-training ones, then those of each folder, by name."""
    root = _root()
    found: list[ShippedRecipe] = []
    if root is not None:
        _collect(root, "", found)
    return sorted(found, key=lambda r: (r.name.count("/"), r.name))


def _collect(folder: Traversable, prefix: str, found: list[ShippedRecipe]) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            if not entry.name.startswith(("_", ".")):  # not __pycache__
                _collect(entry, f"{prefix}{entry.name}/", found)
        elif entry.name.endswith(SUFFIX) and entry.is_file():
            found.append(ShippedRecipe(prefix + entry.name.removesuffix(SUFFIX), entry))


def _name_of(text: str) -> str:
    """`probe/cifar10.toml` and `probe\\cifar10` name `probe/cifar10`."""
    return text.strip().replace("\\", "/").removesuffix(SUFFIX)


def find_recipe(name: str, *, as_file: bool = False) -> ShippedRecipe:
    """The shipped recipe named `name`, or `BadInputError` with the close matches.

    `as_file`: `name` was given where a recipe file is expected (and no such file exists);
    the message then says both."""
    recipes = {r.name: r for r in list_recipes()}
    key = _name_of(name)
    if key in recipes:
        return recipes[key]
    what = "recipe file not found, and no shipped recipe" if as_file else "no shipped recipe"
    raise BadInputError(f"{name}: {what} has that name{_suggest(key, list(recipes))}")


def _suggest(key: str, names: list[str]) -> str:
    """`; did you mean demo, probe/demo?`, else where the names are listed. A clone's path
    (`recipes/demo.toml`) suggests its name; a bare file name (`cifar10`, `flowers`) is
    also compared with the file names in each folder."""
    key = key.removeprefix("./").removeprefix("recipes/")
    if key in names:
        close = [key]
    else:
        same = [n for n in names if n.rsplit("/", 1)[-1] == key]
        close = same or _closest(key, names)
    if close:
        return f"; did you mean {', '.join(close)}? ('cratemae recipes' lists them)"
    return "; 'cratemae recipes' lists them"


def _closest(key: str, names: list[str], n: int = 3, cutoff: float = 0.7) -> list[str]:
    """difflib's close matches, scored on the whole name or, for a key without a folder, on
    the file name alone, whichever is closer."""
    def score(name: str) -> float:
        whole = difflib.SequenceMatcher(None, key, name).ratio()
        if "/" in key:
            return whole
        return max(whole, difflib.SequenceMatcher(None, key, name.rsplit("/", 1)[-1]).ratio())

    scored = sorted(((score(name), name) for name in names), key=lambda pair: -pair[0])
    return [name for ratio, name in scored if ratio >= cutoff][:n]


def resolve_recipe(recipe: str | Path) -> Path | Traversable:
    """What a recipe argument names: an existing file as given, else the shipped recipe of
    that name; `BadInputError` (with the close matches) if neither."""
    path = Path(recipe)
    if special_kind(path) is not None:  # a FIFO or a device: refused, never waited on
        return regular_file(path, "recipe")
    if path.is_file():
        return path
    return find_recipe(str(recipe), as_file=True).resource
