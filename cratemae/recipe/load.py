"""Reading a recipe: TOML file -> `--set` overrides -> validation, with one-line errors.

Defaults live in the schema, the recipe file overrides them, and `--set a.b=value`
overrides the file. Every error names the file, the key path and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from cratemae.errors import BadInputError
from cratemae.recipe.schema import Recipe
from cratemae.recipe.shipped import resolve_recipe

# The deepest a recipe goes is section.key = [[...]]: a few levels; the limit leaves room.
MAX_DEPTH = 8
# Every integer a recipe holds must fit 64 bits (torch, numpy and the OS take no more).
INT_MIN, INT_MAX = -(2**63), 2**63 - 1

__all__ = [
    "MAX_DEPTH",
    "apply_overrides",
    "check_values",
    "diff_recipes",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
    "recipe_hash",
    "unsafe_changes",
]


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate the recipe at `path` (an existing file, else the name of a
    shipped recipe: `demo`, `probe/cifar10`); raise `BadInputError` if it is bad."""
    file = resolve_recipe(path)
    try:  # utf-8-sig: a byte-order mark some editors write is not a TOML error
        raw = tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as err:
        raise BadInputError(f"{file}: invalid TOML: {err}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"{file}: not a text file (expected TOML)") from None
    except RecursionError:
        raise BadInputError(f"{file}: nested deeper than any recipe is (at most "
                            f"{MAX_DEPTH} levels)") from None
    check_values(raw, str(file))
    overrides = list(overrides)
    return parse_recipe(apply_overrides(raw, overrides), source=str(file),
                        overrides=overrides)


def check_values(raw: Any, source: str, prefix: str = "") -> None:
    """What pydantic cannot be trusted with, checked before it sees `raw`: nesting deeper
    than any recipe key (MAX_DEPTH; 10,000 nested arrays would overflow Python's stack) and
    integers beyond 64 bits (they overflow in torch, numpy and the operating system far
    from the recipe). One line naming `source` and the key path."""
    stack: list[tuple[str, Any, int]] = [(prefix, raw, 0)]
    while stack:
        path, value, depth = stack.pop()
        where = f"{source}: {path or '(top level)'}"
        if depth > MAX_DEPTH:
            raise BadInputError(f"{where}: nested deeper than any recipe key (at most "
                                f"{MAX_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v, depth + 1)
                         for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((f"{path}[{i}]", v, depth + 1) for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and not (
                INT_MIN <= value <= INT_MAX):
            raise BadInputError(f"{where}: {_short(value)} is beyond a 64-bit integer "
                                f"({INT_MIN} to {INT_MAX})")


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 30 else f"{text[:12]}...({len(text)} digits)"


def parse_recipe(raw: dict[str, Any], source: str = "<recipe>",
                 overrides: Iterable[str] = ()) -> Recipe:
    """Validate an already-parsed recipe dict; `source` names it in errors, except for the keys
    that one of `overrides` (`--set key=value`) set: those errors name the `--set`."""
    check_values(raw, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        blame = {item.partition("=")[0].strip(): item.strip() for item in overrides}
        raise BadInputError(_format_validation_error(err, source, blame)) from None


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each `key.path=value` applied (value parsed as TOML)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise BadInputError(f"--set {item!r}: expected key.path=value")
        *parents, leaf = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise BadInputError(f"--set {key}: {where} is a value, not a section")
            node = child
        node[leaf] = _parse_value(key, text.strip())
    return raw


def _parse_value(key: str, text: str) -> Any:
    """A TOML value (`3`, `1e-4`, `true`, `[0.9, 0.95]`, `"x"`); anything else is an error
    naming the `--set`, with the quoted form to use (a bare `avg` is not taken as a string:
    `--set optim.lr=1e-4x` would otherwise pass as a string and fail far from here). An
    array or table left open says so: quoting it would not be what was meant."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
        check_values(value, f"--set {key}={text}", prefix=key)
        return value
    except RecursionError:
        raise BadInputError(f"--set {key}: nested deeper than any recipe key") from None
    except tomllib.TOMLDecodeError:
        if text.startswith(("[", "{")):
            raise BadInputError(_bad_list(key, text)) from None
        quoted = json.dumps(text, allow_nan=False)  # a TOML basic string
        raise BadInputError(f"--set {key}={text}: not a TOML value; a string needs quotes: "
                            f"--set '{key}={quoted}'") from None


def _bad_list(key: str, text: str) -> str:
    """What is wrong with a `--set` array or inline table that is not TOML."""
    what, close = ("list", "]") if text.startswith("[") else ("table", "}")
    outside = "".join(text.split('"')[::2])  # the brackets outside double-quoted strings
    if outside.count(text[0]) > outside.count(close):
        why = f"the {what} is not closed (a '{close}' is missing)"
    else:
        why = f"an item of the {what} is not a TOML value (a string needs quotes)"
    example = '["a.tar", "b.tar"]' if what == "list" else '{ name = "x" }'
    return f"--set {key}={text}: {why}; e.g. --set '{key}={example}'"


def _format_validation_error(err: ValidationError, source: str,
                             blame: dict[str, str] | None = None) -> str:
    """One line per problem: `file: key.path: what was expected (got value)`. A key set by
    `--set` is blamed on that `--set` (`blame`: key path -> the whole `key=value`), and an
    unknown key names the nearest valid one."""
    lines = []
    for e in err.errors():
        parts = [str(p) for p in e["loc"]]
        loc = ".".join(parts) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            near = _nearest_key(parts)
            if near:
                msg += f" (did you mean {near}?)"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                got = repr(e["input"])
                msg += f" (got {got if len(got) <= 60 else got[:57] + '...'})"
        lines.append(f"{_blamed(parts, blame or {}) or source}: {loc}: {msg}")
    return "\n".join(lines)


def _blamed(parts: list[str], blame: dict[str, str]) -> str | None:
    """`--set key=value` when that `--set` set this key path, a section above it, or a key
    below it (`--set model.x.y=1`: pydantic reports the unknown `model.x`)."""
    for i in range(len(parts), 0, -1):
        item = blame.get(".".join(parts[:i]))
        if item is not None:
            return f"--set {item}"
    below = ".".join(parts) + "."
    item = next((v for k, v in blame.items() if parts and k.startswith(below)), None)
    return f"--set {item}" if item is not None else None


def _nearest_key(parts: list[str]) -> str | None:
    """The valid key path closest to the unknown `parts`: a close spelling in the same
    section first (`schedule.max_step` -> `schedule.max_steps`), else the same or a close
    name in another section (`optim.max_steps` -> `schedule.max_steps`)."""
    if not parts:
        return None
    *parents, leaf = parts
    model: Any = Recipe
    for part in parents:
        field = model.model_fields.get(part)
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    prefix = "".join(f"{p}." for p in parents)
    match = difflib.get_close_matches(leaf, list(model.model_fields), n=1, cutoff=0.7)
    if match:
        return prefix + match[0]
    everywhere = {f"{name}.{key}": key for name, field in Recipe.model_fields.items()
                  if isinstance(field.annotation, type)
                  and issubclass(field.annotation, BaseModel)
                  for key in field.annotation.model_fields}
    exact = [path for path, key in everywhere.items() if key == leaf]
    if exact:
        return exact[0]
    match = difflib.get_close_matches(leaf, list(everywhere.values()), n=1, cutoff=0.8)
    return next(path for path, key in everywhere.items() if key == match[0]) if match else None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML (unset optional fields are left out)."""
    return tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True))


def recipe_hash(recipe: Recipe) -> str:
    """A short, stable hash of the resolved recipe (stored in checkpoints)."""
    text = json.dumps(recipe.model_dump(mode="json"), sort_keys=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_recipes(old: Recipe, new: Recipe) -> dict[str, tuple[Any, Any]]:
    """Every key path whose value differs, mapped to (old, new)."""
    out: dict[str, tuple[Any, Any]] = {}
    _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), "", out)
    return out


def _diff(a: Any, b: Any, prefix: str, out: dict[str, tuple[Any, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            _diff(a.get(k), b.get(k), f"{prefix}{k}.", out)
    elif a != b:
        out[prefix.rstrip(".")] = (a, b)


def unsafe_changes(old: Recipe, new: Recipe) -> list[str]:
    """The changed key paths that are not marked safe to change on resume."""
    return [k for k in diff_recipes(old, new) if not _is_safe(Recipe, k.split("."))]


def _is_safe(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("safe_to_change"):
        return True
    sub = field.annotation
    if len(parts) > 1 and isinstance(sub, type) and issubclass(sub, BaseModel):
        return _is_safe(sub, parts[1:])
    return False
