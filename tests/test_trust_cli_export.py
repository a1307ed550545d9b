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


def test_export_into_a_folder_of_another_programs_files_is_exit_2(weights, tmp_path,
                                                                   demo_checkpoint):
    """A folder holding a README.md and a config.json of the user's: they were replaced by
    the export's (exit 0, no word). Refused, nothing read or touched; an export's own
    folder is written again, and a folder of other names is written into."""
    mine = tmp_path / "docs"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.json").write_text('{"mine": 1}')
    line = refused(weights, "--out", mine)
    assert line.endswith("holds config.json, README.md, which cratemae export did not "
                         "write and would replace; give a new or empty directory")
    assert (mine / "README.md").read_text() == "my notes"
    assert (mine / "config.json").read_text() == '{"mine": 1}'
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    for _ in range(2):  # into a folder of other files, then into its own export again
        assert cli("export", demo_checkpoint, "--out", out).exit_code == 0
    assert (out / "notes.txt").read_text() == "kept" and (out / "model.safetensors").is_file()
