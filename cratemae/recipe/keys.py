"""The recipe reference (`cratemae recipes keys`): every key with its type, default and one
line of help, read from the schema itself, so that it cannot go stale.

The help of a key is its pydantic `description` when it has one, else the comment on its
line or just above it in `cratemae.recipe.schema`, else (the model section's fields) the
`Args:` entry of `cratemae.model.CrateMAEConfig`'s docstring.
"""

from __future__ import annotations

import enum
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cratemae.model.config import CrateMAEConfig
from cratemae.recipe.schema import Recipe

__all__ = ["KeyDoc", "recipe_keys"]


@dataclass(frozen=True)
class KeyDoc:
    """One leaf key of the recipe."""

    path: str  # "schedule.max_steps"
    type: str  # "int > 0 | None"
    default: str  # as TOML would spell it; "-" when unset
    help: str


def recipe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of `model` (sections walked), in the schema's order."""
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys.extend(recipe_keys(sub, f"{prefix}{name}."))
            continue
        keys.append(KeyDoc(prefix + name, _type_name(field.annotation, field.metadata),
                           _default(field.default), _help(model, name, field)))
    return keys


def _type_name(annotation: Any, metadata: list[Any] = ()) -> str:  # type: ignore[assignment]
    """`int > 0`, `"token"|"avg"`, `[float, float]`, `str | [str]`, `float | None`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0], [*args[1:], *metadata])
    if origin is Literal:
        return "|".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args) + _bounds(metadata)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{_type_name(args[0])}, ...]"
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"[{_type_name(args[0])}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(f'"{m.value}"' for m in annotation)
    return getattr(annotation, "__name__", str(annotation)) + _bounds(metadata)


def _bounds(metadata: list[Any]) -> str:
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >="}
    words = []
    for item in metadata:
        for attr, sign in signs.items():
            value = getattr(item, attr, None)
            if value is not None and not isinstance(item, FieldInfo | type):
                words.append(f"{sign} {value}")
        if isinstance(item, FieldInfo):
            words.extend(_bounds(item.metadata).split(", ") if item.metadata else [])
    words = [w.strip() for w in words if w.strip()]
    return (" " + ", ".join(words)) if words else ""


def _default(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    return str(value)


def _help(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    if field.description:
        return _first_sentence(field.description)
    comment = _comments(model).get(name)
    if comment:
        return comment
    return _config_args().get(name, "")


def _first_sentence(text: str) -> str:
    """Up to the first full stop followed by a space outside brackets (so "He et al. 2022"
    in parentheses does not end it); semicolons do not end it: "...; unset: none" is help."""
    text = " ".join(text.split())
    depth = 0
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if char == "." and depth <= 0 and text[i + 1:i + 2] == " ":
            return text[: i + 1]
    return text


_FIELD_LINE = re.compile(r"^    (\w+):")


@functools.cache  # parsing a class's source costs milliseconds: once per section, not per key
def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's comment in the class source: on its line, else the block above it."""
    try:
        source = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    block: list[str] = []
    for line in source:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("# "))
            continue
        match = _FIELD_LINE.match(line)
        if match:
            _, _, trailing = line.partition("  # ")
            text = trailing.strip() or " ".join(block)
            if text:
                found[match.group(1)] = _first_sentence(text)
        block = []
    return found


@functools.cache
def _config_args() -> dict[str, str]:
    """`CrateMAEConfig`'s `Args:` entries, first sentence each."""
    doc = inspect.getdoc(CrateMAEConfig) or ""
    entries: dict[str, str] = {}
    current = None
    for line in doc.split("Args:", 1)[-1].splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2)
        elif current and line.startswith("        "):
            entries[current] += " " + line.strip()
    return {k: _first_sentence(v) for k, v in entries.items()}
