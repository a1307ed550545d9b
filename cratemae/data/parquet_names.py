"""The class names of a Hugging Face data set's label column: its `ClassLabel` names in
`dataset_infos.json` or in `README.md`'s front matter (`dataset_info: features:`), found
beside the Parquet files or above them; numbered 0..n-1 and each once, else left out (a gap
would shift every name after it).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from cratemae.guard import regular_file

__all__ = ["class_names"]

log = logging.getLogger("cratemae.data")


def _front_matter(readme: Path) -> dict | None:
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        import yaml

        data = yaml.safe_load(m.group(1))
    except Exception:  # no yaml, or front matter it cannot read: no names from it
        return None
    return data if isinstance(data, dict) else None


def _names_in_infos(configs: list[tuple[str, Any]], column: str) -> dict[str, tuple[str, ...]]:
    """config -> the ClassLabel names of `column`, from dataset_infos.json's features
    ({column: {"names": [...]}}) or the front matter's ([{name, dtype: {class_label:
    {names: {"0": ...}}}}])."""
    out = {}
    for config, features in configs:
        names = None
        if isinstance(features, dict) and isinstance(features.get(column), dict):
            names = features[column].get("names")
        elif isinstance(features, list):
            for f in features:
                if isinstance(f, dict) and f.get("name") == column:
                    dtype = f.get("dtype")
                    label = dtype.get("class_label") if isinstance(dtype, dict) else None
                    names = label.get("names") if isinstance(label, dict) else None
        if isinstance(names, dict):
            try:
                by = {int(k): v for k, v in names.items()}
            except (TypeError, ValueError):
                by = {}
            # the labels 0..n-1, each named once: a gap would shift every name after it
            names = [by[i] for i in range(len(names))] if sorted(by) == list(
                range(len(names))) else None
            if names is None:
                log.warning("%s: its ClassLabel names are not numbered 0..n-1; left out",
                            config)
        if isinstance(names, list) and names and all(isinstance(n, str | int) for n in names):
            out[config] = tuple(str(n) for n in names)
    return out


def class_names(src: Path, files: list[Path], column: str | None) -> tuple[str, ...] | None:
    """The label column's ClassLabel names from dataset_infos.json or README.md, found
    beside the files or above them up to `src`; the config whose folder holds the files
    when there are several."""
    if column is None:
        return None
    top = src if src.is_dir() else src.parent
    folders = {top, *(p for f in files for p in f.parents if p == top or top in p.parents)}
    configs: list[tuple[str, Any]] = []
    for folder in sorted(folders):
        infos, readme = folder / "dataset_infos.json", folder / "README.md"
        if regular_file(infos).is_file():
            try:
                data = json.loads(infos.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if isinstance(data, dict):
                configs += [(c, v.get("features")) for c, v in data.items() if isinstance(v, dict)]
        if regular_file(readme).is_file():
            info = (_front_matter(readme) or {}).get("dataset_info")
            for entry in info if isinstance(info, list) else [info]:
                if isinstance(entry, dict):
                    configs.append((str(entry.get("config_name", "default")),
                                    entry.get("features")))
    found = _names_in_infos(configs, column)
    parts = {p for f in files for p in f.relative_to(top).parts[:-1]} if src.is_dir() else set()
    mine = [n for c, n in found.items() if c in parts]
    choices = set(mine) or set(found.values())
    if len(choices) == 1:
        return choices.pop()
    if choices:
        log.warning("%s: its metadata names the classes of %s differently in several configs;"
                    " the labels' numbers stand for them", src, column)
    return None
