"""cratemae.guard: the one check of where a command may write and what it may read as a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cratemae.errors import EXIT_BAD_INPUT, BadInputError
from cratemae.guard import check_output, regular_file
from cratemae.rundir import RunFiles


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    RunFiles(run).checkpoints.mkdir(parents=True)
    RunFiles(run).recipe.write_text("")
    return run


def test_a_fifo_is_refused_as_input_and_as_output(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="is a FIFO") as err:
        regular_file(fifo, "weights")
    assert err.value.exit_code == EXIT_BAD_INPUT
    with pytest.raises(BadInputError, match="is a FIFO"):
        check_output(fifo)


def test_a_device_is_refused_as_output() -> None:
    with pytest.raises(BadInputError, match="is a device"):
        check_output("/dev/full")


def test_output_onto_or_around_what_is_read_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(BadInputError, match="is the input"):
        check_output(weights, reads=[weights])
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(BadInputError, match="inside"):
        check_output(data / "x.safetensors", reads=[data])
    with pytest.raises(BadInputError, match="holds the input"):
        check_output(tmp_path, kind="dir", reads=[weights])
    check_output(tmp_path / "other.safetensors", reads=[weights, data])  # elsewhere is fine


def test_output_inside_a_runs_checkpoints_is_refused(tmp_path: Path) -> None:
    run = _run(tmp_path)
    with pytest.raises(BadInputError, match="checkpoints of the run"):
        check_output(RunFiles(run).checkpoints / "feats.safetensors")
    check_output(run / "feats.safetensors")  # beside them: the run is not being read here


def test_file_and_directory_kinds_are_kept_apart(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="is a directory"):
        check_output(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(BadInputError, match="is a file"):
        check_output(tmp_path / "f", kind="dir")
    with pytest.raises(BadInputError, match="not a directory"):
        check_output(tmp_path / "f" / "below.txt")
