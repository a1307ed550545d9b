"""`write_shards` / `cratemae shard`: round trip, splits, atomic shards, refusing to clobber."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import typer
from data_fixtures import (
    encode,
    photo,
    read_shards,
    solid,
)
from PIL import Image
from typer.testing import CliRunner

import cratemae.data.writer as writer_mod
from cratemae.commands.shard import shard
from cratemae.data import build_loader, write_shards
from cratemae.errors import BadInputError
from cratemae.recipe.schema import DataSection


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageFolder tree of real photographs in several formats, plus two non-images."""
    root = tmp_path_factory.mktemp("tree")
    files = {
        "cat/chelsea.jpg": encode(photo("chelsea"), "JPEG", quality=90),
        "cat/chelsea.small.png": encode(photo("chelsea")[::4, ::4]),  # dot in the name
        "cup/coffee.jpg": encode(photo("coffee"), "JPEG", quality=85),
        "cup/sub/coffee_grey.bmp": encode(Image.fromarray(photo("coffee")).convert("L"), "BMP"),
        "man/astronaut.png": encode(photo("astronaut")[::2, ::2]),
        "man/camera.tif": encode(photo("camera"), "TIFF"),
        "man/notes.txt": b"not an image",
        "man/broken.jpg": encode(photo("astronaut"), "JPEG")[:3000],  # truncated
    }
    for i in range(12):
        files[f"man/s{i}.png"] = encode(solid(i, 20))
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_round_trip_is_exact(tree, tmp_path):
    out = tmp_path / "out"
    summary = write_shards(tree, out, max_per_shard=5, seed=1)
    assert summary.classes == ("cat", "cup", "man")
    assert sorted(p for p, _ in summary.skipped) == [
        str(tree / "man/broken.jpg"),
        str(tree / "man/notes.txt"),
    ]
    index = json.loads((out / "shards.json").read_text())
    assert index["classes"] == ["cat", "cup", "man"] and list(index["splits"]) == ["train"]
    samples = read_shards(out, "train")
    assert sum(e["samples"] for e in index["splits"]["train"]) == len(samples) == 18
    for e in index["splits"]["train"]:  # counts per shard are right
        with tarfile.open(out / e["name"]) as tf:
            assert len(tf.getmembers()) == 2 * e["samples"] <= 10
    for rel in ["cat/chelsea.jpg", "cup/coffee.jpg", "man/astronaut.png", "man/s3.png"]:
        key, ext = rel.rsplit(".", 1)
        assert samples[key][ext.replace("jpeg", "jpg")] == (tree / rel).read_bytes()
    assert samples["cat/chelsea_small"]["png"] == (tree / "cat/chelsea.small.png").read_bytes()
    for rel, key in [
        ("cup/sub/coffee_grey.bmp", "cup/sub/coffee_grey"),
        ("man/camera.tif", "man/camera"),
    ]:
        src = np.asarray(Image.open(tree / rel))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(samples[key]["png"]))), src)
    labels = {k: int(v["cls"]) for k, v in samples.items()}
    assert labels["cat/chelsea"] == 0 and labels["cup/sub/coffee_grey"] == 1
    assert labels["man/s0"] == 2
    assert list(out.glob(".*")) == []  # no temporary files left


def test_val_split_and_reading_back(tree, tmp_path):
    out = tmp_path / "out"
    summary = write_shards(tree, out, val_fraction=0.2, seed=0)
    train, val = read_shards(out, "train"), read_shards(out, "val")
    assert len(val) == summary.samples("val") == 4 and len(train) == 14
    assert not set(train) & set(val)
    data = DataSection(train=str(out), val=str(out), batch_size=2, num_workers=0)
    kw = dict(augment="none", img_size=16, seed=0, epoch=0)
    got = [int(y) for b in build_loader(data, split="val", **kw) for y in b.labels]
    assert sorted(got) == sorted(int(v["cls"]) for v in val.values())
    assert len(build_loader(data, split="train", **kw)) == 7


def test_flat_folder_is_unlabelled(tmp_path):
    (tmp_path / "flat").mkdir()
    for i in range(5):
        solid(i).save(tmp_path / "flat" / f"img{i}.jpg", quality=95)
    summary = write_shards(tmp_path / "flat", tmp_path / "out")
    samples = read_shards(tmp_path / "out", "train")
    assert summary.classes is None and len(samples) == 5
    assert all(set(v) == {"jpg"} for v in samples.values())


def test_an_interrupted_overwrite_leaves_the_old_shards_whole(tree, tmp_path):
    """`--overwrite` removes the old shards only once every new one is complete."""
    out = tmp_path / "out"
    write_shards(tree, out, max_per_shard=6)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(done: int, total: int) -> None:
        if done == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(tree, out, max_per_shard=4, overwrite=True, progress=boom)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing else left
    with pytest.raises(BadInputError, match=r"not empty; pass --overwrite"):
        write_shards(tree, out)
    assert write_shards(tree, out, overwrite=True, max_per_shard=4).samples("train") == 18
    assert sorted(p.name for p in out.iterdir()) == [
        "shards.json", *[f"train-{i:06d}.tar" for i in range(5)]]
    with tarfile.open(out / "train-000000.tar") as tf:
        assert len(tf.getmembers()) == 8


def test_failure_inside_a_shard_removes_its_temporary_file(tree, tmp_path, monkeypatch):
    calls = []
    real = writer_mod._ShardSink._member

    def failing(self, name, data):
        calls.append(name)
        if len(calls) == 13:  # mid-way through shard 1 (4 samples = 8 members a shard)
            assert list((tmp_path / "out").glob("*staging*/.train-000001.tar.tmp-*"))
            raise OSError("disk full")
        real(self, name, data)

    monkeypatch.setattr(writer_mod._ShardSink, "_member", failing)
    with pytest.raises(OSError, match="disk full"):
        write_shards(tree, tmp_path / "out", max_per_shard=4)
    assert not (tmp_path / "out").exists()  # no shard, no temporary, no index: not even OUT


def test_bad_arguments(tree, tmp_path):
    with pytest.raises(BadInputError, match="not a directory"):
        write_shards(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(BadInputError, match=r"inside .*, which is being read"):
        write_shards(tree, tree / "shards")
    with pytest.raises(BadInputError, match="val-fraction"):
        write_shards(tree, tmp_path / "out", val_fraction=1.5)


def test_shard_command(tree, tmp_path):
    app = typer.Typer()
    app.command()(shard)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(
        app, [str(tree), str(out), "--max-per-shard", "3", "--val-fraction", "0.1", "--seed", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "train: 16 samples in 6 shards" in res.output
    assert "val: 2 samples in 1 shards" in res.output
    assert "left out" in res.output and "notes.txt" in res.output
    res = runner.invoke(app, [str(tree), str(out)])
    assert isinstance(res.exception, BadInputError) and "--overwrite" in str(res.exception)
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "Examples:" in res.output and "--max-per-shard" in res.output
