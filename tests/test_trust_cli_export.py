"""`cratemae export --out` is checked by `cratemae.guard.check_output` before any weights are
read: a special file, a place that cannot be written, or the weights being read are exit 2
with one line, as in every command. A junk weights file shows that nothing was read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import cli

import cratemae.guard


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    file = tmp_path / "src" / "model.safetensors"
    file.parent.mkdir()
    file.write_bytes(b"junk: never read when --out is refused")
    return file


def refused(*args: object) -> str:
    result = cli("export", *args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --out ")
    return line


def test_export_to_dev_full_is_exit_2(weights):
    assert "is a device" in refused(weights, "--out", "/dev/full")


def test_export_into_a_folder_it_cannot_write_is_exit_2(weights, tmp_path, monkeypatch):
    real = os.access  # root ignores chmod: take write permission away by hand

    def access(path, mode, *args, **kwargs):
        return False if mode & os.W_OK else real(path, mode, *args, **kwargs)

    monkeypatch.setattr(cratemae.guard.os, "access", access)
    assert "no permission to write" in refused(weights, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_below_a_file_or_over_its_source_is_exit_2(weights, tmp_path):
    assert "is not a directory" in refused(weights, "--out", weights / "x")
    assert "holds the input" in refused(weights, "--out", weights.parent)
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(weights, "--out", tmp_path / "file")
