"""Bad data: skipped, counted and logged with shard and key; label errors and too many bad
samples stop the run with a one-line BadInputError naming shard (and key)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    data_section,
    encode,
    label_stream,
    make_shards,
    photo,
    shards_with_bad,
    solid,
    write_tar,
)
from PIL import Image
from support import tiny_recipe

from cratemae.data import build_loader
from cratemae.data.decode import BadLog
from cratemae.errors import BadInputError


def _loader(data, **kw):
    args = dict(split="train", augment="crop", img_size=16, seed=0, epoch=0)
    return build_loader(data, **{**args, **kw})


def _good(i: int) -> list[tuple[str, bytes]]:
    return [(f"k{i}.png", encode(solid(i))), (f"k{i}.cls", b"%d" % i)]


def _bomb_png() -> bytes:
    """A small file that decodes to 10000 x 10000 pixels (over PIL's 89M-pixel limit)."""
    return encode(Image.new("1", (10000, 10000)), "PNG")


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    """Two shards of 40 samples; shard 0 holds 5 bad ones, shard 1 odd-but-valid images."""
    root = tmp_path_factory.mktemp("bad")
    jpeg = encode(photo("astronaut"), "JPEG", quality=90)
    members = []
    for i in range(35):
        members += _good(i)
    members += [("t0.jpg", jpeg[: len(jpeg) // 2]), ("t0.cls", b"35")]  # truncated JPEG
    members += [("x1.jpg", b"this is a text file, not a JPEG"), ("x1.cls", b"36")]
    members += [("z2.jpg", b""), ("z2.cls", b"37")]  # zero-byte member
    members += [("n3.txt", b"no image in this sample"), ("n3.cls", b"38")]
    members += [("b4.png", _bomb_png()), ("b4.cls", b"39")]
    write_tar(root / "a-000000.tar", members)
    odd = [
        ("grey.png", encode(photo("camera"))),  # L
        ("pal.png", encode(Image.fromarray(photo("coffee")).convert("P"))),  # palette
        ("cmyk.jpg", encode(Image.fromarray(photo("chelsea")).convert("CMYK"), "JPEG")),
        ("rgba.png", encode(Image.fromarray(photo("astronaut")).convert("RGBA"))),
        ("i16.png", encode(Image.fromarray(photo("camera").astype(np.uint16) * 257))),
    ]
    members = []
    for j, (name, data) in enumerate(odd):
        members += [(name, data), (name.split(".")[0] + ".cls", b"%d" % (100 + j))]
    for i in range(40 - len(odd)):
        members += _good(200 + i)
    write_tar(root / "a-000001.tar", members)
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_skipped_counted_and_logged(bad_shards, workers, caplog):
    data = data_section(str(bad_shards), batch_size=8, num_workers=workers, max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="cratemae.data"):
        batches = list(_loader(data))
    assert len(batches) == 10 and all(len(b) == 8 for b in batches)  # bad slots refilled
    assert sum(b.bad for b in batches) == 5
    shard0 = str(bad_shards / "a-000000.tar")
    bad_shards_seen = {s for b in batches for s in b.bad_shards}
    assert bad_shards_seen == {shard0}
    if workers == 0:  # worker processes log through their own handlers
        text = caplog.text
        for key, why in [
            ("t0", "corrupt"),
            ("x1", "not an image"),
            ("z2", "zero-byte"),
            ("n3", "no image member"),
            ("b4", "image too large"),
        ]:
            assert f"'{key}' in {shard0}: {why}" in text
    labels = {int(y) for b in batches for y in b.labels}
    assert {100, 101, 102, 103, 104} <= labels  # odd modes decode as RGB, not counted bad
    assert not labels & {35, 36, 37, 38, 39}


def first_verdict(loader) -> BadInputError | None:
    """Iterate as the training loop does: ask for the verdict after every batch."""
    for _ in loader:
        error = loader.bad_fraction_error()
        if error is not None:
            return error
    return None


def test_too_many_bad_samples_names_the_worst_shard(bad_shards, monkeypatch):
    import cratemae.data.loader as loader_mod

    monkeypatch.setattr(loader_mod, "MIN_SAMPLES_FOR_BAD_CHECK", 40)
    data = data_section(str(bad_shards), batch_size=8, max_bad_fraction=0.01)
    error = first_verdict(_loader(data))
    assert error is not None
    assert re.search(r"worst shards: \S*a-000000\.tar \(\d bad\)", str(error))


def test_bad_fraction_waits_for_200_samples(bad_shards):
    data = data_section(str(bad_shards), batch_size=8, max_bad_fraction=0.01)
    loader = _loader(data)
    assert len(list(loader)) == 10  # 80 samples seen: below the minimum, no verdict yet
    assert loader.bad == 5 and loader.seen == 80
    assert loader.bad_fraction_error() is None
    # ... unless every sample has been seen: a small data set is judged at its end
    assert "5 of 80 samples were bad" in str(loader.bad_fraction_error(final=True))


def test_bad_fraction_over_many_samples(tmp_path):
    members = []
    for i in range(300):
        members += _good(i) if i % 25 else [(f"k{i}.jpg", b"junk"), (f"k{i}.cls", b"0")]
    write_tar(tmp_path / "s-000000.tar", members)
    write_tar(tmp_path / "s-000001.tar", [m for i in range(300, 340) for m in _good(i)])
    data = data_section(str(tmp_path), batch_size=10, max_bad_fraction=0.01)
    error = first_verdict(_loader(data))
    assert re.search(
        r"of 200 samples .*% > data\.max_bad_fraction 1%\); worst shards: \S*s-000000\.tar",
        str(error))
    loose = data.model_copy(update={"max_bad_fraction": 0.05})
    assert first_verdict(_loader(loose)) is None
    assert len(label_stream(_loader(loose))) == 340


def test_truncated_shard_counts_its_lost_samples(tmp_path):
    make_shards(tmp_path / "d", [20, 20])
    tar = tmp_path / "d" / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # an interrupted copy
    data = data_section(str(tmp_path / "d"), batch_size=4, max_bad_fraction=1.0)
    loader = _loader(data)
    batches = list(loader)
    assert len(batches) == 10 and all(len(b) == 4 for b in batches)
    assert 5 <= loader.bad <= 12 and set(loader.bad_by_shard) == {str(tar)}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("cls", "match"),
    [(None, "has no cls label"), (b"seven", "malformed cls label b'seven'"), (b"-1", "malformed")],
)
def test_label_errors_name_shard_and_key(tmp_path, workers, cls, match):
    members = [m for i in range(6) for m in _good(i)]
    members += [("odd.png", encode(solid(9)))] + ([("odd.cls", cls)] if cls is not None else [])
    members += [m for i in range(6, 12) for m in _good(i)]
    shard = write_tar(tmp_path / "lab-000000.tar", members)
    write_tar(tmp_path / "lab-000001.tar", [m for i in range(20, 33) for m in _good(i)])
    data = data_section(str(tmp_path), batch_size=2, num_workers=workers, shuffle_buffer=0)
    with pytest.raises(BadInputError) as err:
        list(_loader(data, world_size=1))
    assert str(shard) in str(err.value) and "'odd'" in str(err.value) and match in str(err.value)
    assert "\n" not in str(err.value)
    # pre-training needs no labels
    assert len(list(_loader(data, augment="crop", labels=False))) == 13


def test_bad_log_is_rate_limited(caplog):
    log = BadLog()
    with caplog.at_level(logging.WARNING, logger="cratemae.data"):
        for i in range(2500):
            log("shard.tar", f"k{i}", "corrupt")
    assert len(caplog.records) == 20 + 2  # first 20, then samples 1000 and 2000
    assert "'k999' in shard.tar" in caplog.records[-2].getMessage()


# --- bad data in a run: one verdict, agreed by every rank -----------------------------------


def test_pretraining_over_mostly_bad_data_stops_in_one_line(tmp_path: Path) -> None:
    from cratemae.tasks.pretrain import pretrain

    root, _ = shards_with_bad(tmp_path / "data", [48, 48], set(range(0, 96, 2)), size=32)
    recipe = tiny_recipe(f"data.train='{root}'", "data.num_workers=0", "schedule.epochs=3",
                         "run.checkpoint_every_minutes=1000")
    with pytest.raises(BadInputError, match=r"of 96 samples were bad \(50\.0% > "):
        pretrain(recipe, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing saved past bad data
