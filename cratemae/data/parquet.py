"""Hugging Face Parquet data sets (work in progress)."""

from __future__ import annotations

from pathlib import Path

from cratemae.data.records import Records
from cratemae.errors import BadInputError


def is_parquet_source(src: Path) -> bool:
    return False


def parquet_records(src: Path, image_column, label_column, seed) -> Records:
    raise BadInputError(f"{src}: Parquet is not read yet")
