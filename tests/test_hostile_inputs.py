"""Hostile files given where data or an image is expected: refused in one line or handled,
never a hang, a traceback or an allocation sized by the file's claims."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cratemae.data.decode import read_image_file
from cratemae.data.folders import list_images
from cratemae.errors import BadInputError


def _png(path: Path, size: tuple[int, int]) -> Path:
    Image.new("L", size, 128).save(path, "PNG")
    return path


def test_a_symlink_loop_in_an_image_folder_is_followed_once(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "cat" / "inner").mkdir(parents=True)
    _png(root / "cat" / "a.png", (8, 8))
    _png(root / "cat" / "inner" / "b.png", (8, 8))
    (root / "cat" / "inner" / "loop").symlink_to(root / "cat")  # back up the tree
    files, classes = list_images(root)
    assert classes == ("cat",)
    assert sorted(os.path.basename(f) for f, _ in files) == ["a.png", "b.png"]


def test_a_link_to_another_class_or_the_root_is_refused_not_read_twice(tmp_path: Path) -> None:
    """`a/sneaky -> ../b` read b's images twice, once labelled a (exit 0); a link up to the
    root read every class again under a; two class names for one folder, the same. Each is
    one BadInputError naming the link; a link to a folder outside, from one class, is read."""
    root = tmp_path / "images"
    for c in "ab":
        (root / c).mkdir(parents=True)
        _png(root / c / f"{c}0.png", (8, 8))
    (root / "a" / "sneaky").symlink_to(root / "b")
    with pytest.raises(BadInputError, match=r"a/sneaky: is the folder .*/b \(a link\), of class "
                       r"b; its images would be read twice, once labelled a$"):
        list_images(root)
    (root / "a" / "sneaky").unlink()
    (root / "a" / "up").symlink_to(root)
    with pytest.raises(BadInputError, match=r"a/up: is the folder .*, of the root of the classes"):
        list_images(root)
    (root / "a" / "up").unlink()
    (root / "c").symlink_to(root / "b")
    with pytest.raises(BadInputError, match=r"/c: is the folder .*/b \(a link\)"):
        list_images(root)
    (root / "c").unlink()
    (tmp_path / "outside").mkdir()
    _png(tmp_path / "outside" / "o.png", (8, 8))
    (root / "b" / "more").symlink_to(tmp_path / "outside")
    files, classes = list_images(root)
    assert classes == ("a", "b")
    assert [(os.path.basename(f), y) for f, y in files] == [("a0.png", 0), ("b0.png", 1),
                                                           ("o.png", 1)]


def test_an_empty_class_folder_is_left_out_with_a_warning(tmp_path: Path, caplog) -> None:
    """Labels are numbered over the folders that hold images: an empty `b/` shifts `c` from
    2 to 1, which another copy of the data with images in `b/` would not. Said, not silent."""
    import logging

    root = tmp_path / "images"
    for c in "abc":
        (root / c).mkdir(parents=True)
    _png(root / "a" / "a0.png", (8, 8))
    _png(root / "c" / "c0.png", (8, 8))
    with caplog.at_level(logging.WARNING, logger="cratemae.data"):
        files, classes = list_images(root)
    assert classes == ("a", "c") and [y for _, y in files] == [0, 1]
    assert "1 folder(s) hold no image and are not classes (b)" in caplog.text


def test_shard_writes_a_folder_with_a_symlink_loop(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "dog").mkdir(parents=True)
    _png(root / "dog" / "a.png", (8, 8))
    (root / "dog" / "again").symlink_to(root / "dog")
    done = subprocess.run([sys.executable, "-m", "cratemae", "shard", str(root),
                           str(tmp_path / "shards")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 image" in done.stdout + done.stderr or "1 sample" in done.stdout + done.stderr


def test_an_extremely_elongated_png_is_refused_before_it_is_resized(tmp_path: Path) -> None:
    path = _png(tmp_path / "line.png", (1_000_000, 1))
    assert path.stat().st_size < 10_000  # a few KB on disk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadInputError, match=r"line\.png: cannot read image: 1000000 x 1 pixels, "
                                            r"an aspect ratio beyond 64:1"):
        read_image_file(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64  # nothing near the 224,000,000 x 224 a resize would have made


def test_ordinary_shapes_still_read(tmp_path: Path) -> None:
    img = read_image_file(_png(tmp_path / "wide.png", (640, 20)))
    assert img.size == (640, 20) and img.mode == "RGB"
    assert np.asarray(img).max() == 128


def test_a_named_pipe_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match=r"photo\.png"):
        read_image_file(fifo)  # returns at once: nothing opens the pipe



def test_file_names_that_are_not_utf8_are_read_from_a_folder_and_sharded(
        tmp_path: Path) -> None:
    from cratemae.data import build_loader
    from cratemae.recipe.schema import DataSection

    (tmp_path / "src" / "cat").mkdir(parents=True)
    _png(tmp_path / "src" / "cat" / "ok.png", (8, 8))
    odd = os.path.join(os.fsencode(tmp_path / "src" / "cat"), b"\xff\xfe.png")
    Image.new("L", (8, 8), 10).save(os.fsdecode(odd), "PNG")
    done = subprocess.run([sys.executable, "-m", "cratemae", "shard", str(tmp_path / "src"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for data in (tmp_path / "src", tmp_path / "out"):
        loader = build_loader(DataSection(train=str(data), num_workers=0, batch_size=1),
                              split="train", img_size=8, seed=0, epoch=0, augment="crop")
        assert sum(len(b) for b in loader) == 2 and loader.bad == 0


@pytest.mark.parametrize(("config", "message"), [
    ({"img_size": 8192, "patch_size": 16}, r"262144 patches an image"),
    ({"embed_dim": 65536, "decoder_embed_dim": 65536, "num_heads": 1,
      "decoder_num_heads": 1}, r"parameters, over 2e\+10"),  # the whole model bounded
    ({"depth": 1024}, r"depth = 1024, its weights hold 1 such layers"),
    ({"depth": 10**8}, r"depth must be at most 1024"),
])
def test_a_weights_file_whose_configuration_lies_is_refused_before_building(
        tmp_path: Path, config: dict, message: str) -> None:
    """A tiny file claiming a huge model: refused in one line, nothing allocated for it."""
    from cratemae.checkpoints import write_model_weights
    from cratemae.model import CrateEncoder, CrateMAEConfig
    from cratemae.weights.load import load_model

    small = CrateMAEConfig(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2,
                           decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    state = CrateEncoder(small).state_dict()
    lying = {**small.to_dict(), **config}
    path = write_model_weights(tmp_path / "model.safetensors", state, lying)
    assert path.stat().st_size < 20_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadInputError, match=message):
        load_model(path)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 64
