"""Where `cratemae embed` writes: OUT, which it replaces only when an embed wrote it, and
OUT.parts, the chunks of an embed in progress, resumed with the same settings or cleared;
the temporaries that dead writers left beside them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from cratemae.errors import BadInputError
from cratemae.eval.embeddings import FORMAT, INDEX_FILE
from cratemae.fs import atomic_write_json, is_temp_name, pid_alive

__all__ = ["SETTINGS_FILE", "parts_dir", "prepare_out", "remove_debris", "written_by_embed"]

log = logging.getLogger("cratemae")

SETTINGS_FILE = "embed.json"


def parts_dir(out: Path) -> Path:
    """Where the chunks of an embed into `out` are kept until it is complete."""
    return out.with_name(out.name + ".parts")


def written_by_embed(directory: Path) -> bool:
    """Whether a directory is the npy output of an embed (which --overwrite may replace)."""
    try:
        index = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("format") == FORMAT


_TEMP_PID = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")


def remove_debris(directory: Path, prefix: str = "") -> None:
    """Remove the temporaries (`cratemae.fs` names) of writers that are gone, or this
    process's: a live writer's file in progress is never touched."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        m = _TEMP_PID.search(p.name)
        if not (is_temp_name(p.name) and m and p.name.startswith(f".{prefix}")):
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue
        log.info("removing stale temporary %s", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def prepare_out(out: Path, parts: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Rank 0: refuse to replace `out` without `overwrite`; resume from the chunks of an
    interrupted embed with the same settings, refuse other settings (or remove them with
    `overwrite`); clear the debris of dead writers."""
    if out.exists() and not overwrite:
        raise BadInputError(f"--out {out}: exists; pass --overwrite to replace it")
    if out.is_dir() and not written_by_embed(out):
        raise BadInputError(f"--out {out}: is a directory that cratemae embed did not write; "
                            "it is not replaced, even with --overwrite")
    remove_debris(out.parent, prefix=out.name)
    settings_file = parts / SETTINGS_FILE
    if parts.exists():
        try:
            found = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if found != record and not overwrite:
            differ = sorted(k for k in record if not isinstance(found, dict)
                            or found.get(k) != record[k])
            raise BadInputError(
                f"{parts}: holds the chunks of an interrupted embed made with other "
                f"settings ({', '.join(differ) or 'unreadable'} differ); rerun it as it was "
                f"to resume, or pass --overwrite to start again")
        if found != record:
            log.info("removing %s (chunks of another embed; --overwrite)", parts)
            shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    if not settings_file.is_file():
        atomic_write_json(settings_file, record)
