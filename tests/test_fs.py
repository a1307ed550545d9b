"""`cratemae.fs`: a write either replaces the file whole or leaves it as it was, with no
temporary left behind; files get the user's umask; JSON is strict."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cratemae.checkpoints.files import write_safetensors
from cratemae.checkpoints.layout import is_temporary
from cratemae.fs import (
    AtomicFile,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    is_temp_name,
    temp_path,
)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _half_by_file(path: Path) -> None:
    with atomic_write(path, "w") as f:
        f.write("new, half written")
        f.flush()
        raise RuntimeError("disk full")


def _half_by_path(path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("new, half written")
        raise RuntimeError("disk full")


def _half_by_open_file(path: Path) -> None:
    pending = AtomicFile(path, "wb")
    pending.file.write(b"new, half written")
    pending.file.flush()
    pending.discard()
    raise RuntimeError("disk full")


@pytest.mark.parametrize("write", [_half_by_file, _half_by_path, _half_by_open_file])
def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        write(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_ctrl_c_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    path.write_text("step-1\n")
    with pytest.raises(KeyboardInterrupt), atomic_write(path, "w") as f:
        f.write("step-")
        raise KeyboardInterrupt
    assert path.read_text() == "step-1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path: Path) -> None:
    """kill -9 (here: os._exit) mid-write: no cleanup code runs, and still the old file is
    there whole; only a hidden temporary, recognisable as such, is left."""
    path = tmp_path / "model.bin"
    path.write_bytes(b"old" * 1000)
    code = ("import os, sys; from cratemae.fs import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n"
            "    f.write(b'new' * 500); f.flush(); os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], timeout=120)
    assert proc.returncode == 9
    assert path.read_bytes() == b"old" * 1000
    debris = [p.name for p in tmp_path.iterdir() if p != path]
    assert len(debris) == 1 and is_temp_name(debris[0])


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "note.txt"  # the directory is created
    atomic_write_text(path, "first")
    atomic_write_text(path, "second, longer")
    assert path.read_text() == "second, longer"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and is_temp_name(tmp.name)
        tmp.write_bytes(b"by path")
    assert path.read_bytes() == b"by path"
    assert [p.name for p in path.parent.iterdir()] == ["note.txt"]


def test_a_path_writer_that_writes_nothing_fails(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    with pytest.raises(FileNotFoundError), atomic_path(path):
        pass
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_umask_permissions(tmp_path: Path, mask: int, expected: int) -> None:
    with umask(mask):
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        with atomic_path(tmp_path / "c.bin") as tmp:
            tmp.write_bytes(b"x")
        write_safetensors(tmp_path / "d.safetensors", {"w": torch.zeros(2)}, {})
    for p in tmp_path.iterdir():
        assert mode(p) == expected, p.name


def test_json_is_strict_indented_and_ends_in_a_newline(tmp_path: Path) -> None:
    path = tmp_path / "best.json"
    record = {"step": 3, "top1": 12.5, "name": "über"}
    atomic_write_json(path, record)
    text = path.read_text()
    assert text == json.dumps(record, indent=1) + "\n"
    atomic_write_json(path, record, indent=2)
    assert path.read_text() == json.dumps(record, indent=2) + "\n"
    for bad in (float("nan"), float("inf"), float("-inf")):  # strict JSON: null, and named
        atomic_write_json(path, {"top1": bad, "top5": 90.0, "per_layer": [1.0, bad]})
        assert json.loads(path.read_text()) == {"top1": None, "top5": 90.0,
                                                "per_layer": [1.0, None], "nonfinite": ["top1"]}
        assert "NaN" not in path.read_text() and "Infinity" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_temporary_names_are_unique_hidden_and_recognised(tmp_path: Path) -> None:
    names = {temp_path(tmp_path / "latest").name for _ in range(200)}
    assert len(names) == 200
    assert all(n.startswith(".latest.tmp-") and is_temp_name(n) for n in names)
    assert all(is_temporary(n) for n in names)  # a crashed `latest` write is checkpoint debris
    assert not is_temp_name("latest") and not is_temp_name("train-000000.tar")


def test_fsync_dir_tolerates_file_systems_without_it(tmp_path, monkeypatch) -> None:
    def refuse(code: int) -> Callable[[int], None]:
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))
    fsync_dir(tmp_path)  # not supported: nothing to do
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError, match="Input/output"):
        fsync_dir(tmp_path)  # a real I/O error is not hidden
