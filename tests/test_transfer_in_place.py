"""The download formats read in place as data.train / data.val: the same samples, labels and
pixels as the shards `cratemae shard` writes of them (data.val reads the val split, else
the test split), and through the loader."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import data_section
from PIL import Image
from test_transfer_cifar import (
    NAMES10,
    read_shards,
    write_cifar10_binary,
    write_cifar10_python,
    write_cifar100_binary,
)
from test_transfer_oxford import write_flowers, write_pets

from cratemae.data import build_data, build_loader
from cratemae.data.decode import image_bytes
from cratemae.data.shards import iter_shard
from cratemae.data.sources import resolve_source
from cratemae.data.writer import write_shards
from cratemae.recipe import load_recipe


def fingerprint(pixels: np.ndarray, label: int) -> tuple[int, str]:
    return label, hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def in_place(root: Path, split: str) -> tuple[Counter, tuple[str, ...] | None]:
    """(label, pixels) of every sample data.SPLIT = root reads, and its classes."""
    source = resolve_source(str(root), split)
    found = Counter()
    for shard in source.shards:
        for raw in iter_shard(shard, 0, shard.count):
            img = np.asarray(Image.open(io.BytesIO(image_bytes(raw))).convert("RGB"))
            found[fingerprint(img, int(raw.parts["cls"]))] += 1
    return found, source.classes


def sharded(root: Path, out: Path) -> dict[str, Counter]:
    write_shards(root, out)
    return {split: Counter(fingerprint(p, y) for p, y in samples.values())
            for split, samples in read_shards(out).items()}


def write_parquet(root: Path) -> Path:
    pytest.importorskip("pyarrow", reason="pyarrow (the cratemae[parquet] extra) is absent")
    from test_transfer_parquet import write_hf

    write_hf(root)
    return root


@pytest.mark.parametrize(("write", "val_split"), [
    (write_cifar10_binary, "test"), (write_cifar10_python, "test"),
    (write_cifar100_binary, "test"), (write_parquet, "test"),
    (write_flowers, "val"), (write_pets, "test"),
], ids=["cifar10-binary", "cifar10-python", "cifar100-binary", "parquet", "flowers102",
        "pets"])
def test_read_in_place_as_its_shards_hold_it(tmp_path: Path, write, val_split: str) -> None:
    write(tmp_path / "dl")
    shards = sharded(tmp_path / "dl", tmp_path / "out")
    index_classes = tuple(json.loads(
        (tmp_path / "out" / "shards.json").read_text())["classes"])
    for split, want in (("train", "train"), ("val", val_split)):
        got, classes = in_place(tmp_path / "dl", split)
        assert got == shards[want], split
        assert classes == index_classes


def test_cifar_in_place_through_the_loader(tmp_path: Path) -> None:
    from test_transfer_cifar import cifar10_batches

    write_cifar10_binary(tmp_path)
    data = data_section(str(tmp_path / "cifar-10-batches-bin"), val=str(tmp_path), batch_size=5)
    train = build_loader(data, split="train", augment="none", img_size=32, seed=0, epoch=0)
    val = build_loader(data, split="val", augment="none", img_size=32, seed=0, epoch=0)
    assert train.classes == NAMES10 and (train.num_samples, val.num_samples) == (15, 4)
    labels = sorted(int(y) for b in val for y in b.labels)
    assert labels == sorted(int(y) for y in cifar10_batches()["test_batch"][1])


def test_data_val_of_shards_with_train_and_test_reads_test(tmp_path: Path) -> None:
    write_cifar10_binary(tmp_path / "dl")
    write_shards(tmp_path / "dl", tmp_path / "out")
    val = resolve_source(str(tmp_path / "out"), "val")
    assert [Path(s.url).name for s in val.shards] == ["test-000000.tar"]
    assert val.classes == NAMES10


# --- the shipped recipes read what `cratemae shard` writes ------------------------------------

WRITERS = {"cifar10": write_cifar10_binary, "cifar100": write_cifar100_binary,
           "flowers102": write_flowers, "pets": write_pets}
# (recipe, data.train's splits, data.val's split)
READS = [("probe/cifar10", ["train"], "test"), ("finetune/cifar10", ["train"], "test"),
         ("probe/cifar100", ["train"], "test"), ("finetune/cifar100", ["train"], "test"),
         ("probe/flowers102", ["train"], "test"), ("finetune/flowers102", ["train", "val"], "test"),
         ("probe/pets", ["train"], "test"), ("finetune/pets", ["train"], "test")]


@pytest.mark.parametrize(("name", "train_splits", "val_split"), READS,
                         ids=[r[0] for r in READS])
def test_shipped_recipes_point_at_what_shard_writes(tmp_path: Path, name: str,
                                                    train_splits: list[str],
                                                    val_split: str) -> None:
    import tomllib

    from support import REPO

    recipe = tomllib.loads((REPO / "recipes" / f"{name}.toml").read_text())
    dataset = name.split("/")[1]
    WRITERS[dataset](tmp_path / "dl")
    write_shards(tmp_path / "dl", tmp_path / dataset)
    task = recipe["probe" if name.startswith("probe") else "finetune"]

    def where(spec):
        return [where(s)[0] for s in spec] if isinstance(spec, list) else [
            spec.replace(f"/data/{dataset}", str(tmp_path / dataset))]

    train = resolve_source(where(recipe["data"]["train"]), "train")
    val = resolve_source(where(recipe["data"]["val"])[0], "val")
    assert sorted({Path(s.url).name.split("-")[0] for s in train.shards}) == train_splits
    assert {Path(s.url).name.split("-")[0] for s in val.shards} == {val_split}
    assert len(train.classes) == len(val.classes) == task["num_classes"]
    # ... and the recipe as shipped loads them: its 8 workers share the few shards a small
    # set makes (one here, one or two from the real downloads) instead of refusing them.
    data = load_recipe(name).data.model_copy(update={"batch_size": 2,
                                                     "train": where(recipe["data"]["train"]),
                                                     "val": where(recipe["data"]["val"])[0]})
    assert data.num_workers > len(train.shards)
    for split in ("train", "val"):
        augment = ("none" if split == "val" else "crop" if name.startswith("probe")
                   else "randaugment")
        loaded = build_data(data, split=split, img_size=32, seed=0, augment=augment)
        assert loaded.data.num_workers == len(loaded.source.shards) and loaded.batches_per_epoch
