"""`cratemae shard` and `cratemae bench-data` given hostile input: a source with no readable
image, an OUT that is the source or a FIFO, numbers out of range, a folder whose sub-folders
are its splits. One `error:` line and exit 2 each, the old shards untouched; and a
train/val folder is sharded as the readers read it, as splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from data_fixtures import data_section, image_tree, read_shards
from support import cli

from cratemae.data.sources import resolve_source
from cratemae.errors import BadInputError


def refused(command: str, *args: object, match: str) -> str:
    res = cli(command, *args)
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and match in res.output, res.output
    assert "Traceback" not in res.output
    return res.output


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return image_tree(tmp_path / "photos", ["cat", "dog"], per_class=2)


# --- 4. a source with nothing to shard; where OUT may be -------------------------------------


def test_a_source_without_a_readable_image_is_an_error_and_keeps_the_old_shards(tmp_path,
                                                                                photos):
    out = tmp_path / "out"
    assert cli("shard", photos, out).exit_code == 0
    before = snapshot(out)
    junk = tmp_path / "junk"
    for c in ("a", "b"):
        (junk / c).mkdir(parents=True)
    for i in range(7):
        (junk / "ab"[i % 2] / f"f{i}.{'jpg' if i < 5 else 'txt'}").write_bytes(b"x" * i)
    msg = refused("shard", junk, out, "--overwrite", match="nothing to shard in train: 7 "
                  "files, none a readable image (")
    assert "6 not an image" in msg and "1 empty file" in msg
    assert snapshot(out) == before  # the old set whole, no staging folder left
    refused("shard", junk, tmp_path / "new", match="none a readable image")
    assert not (tmp_path / "new").exists()
    split = image_tree(tmp_path / "split" / "train", ["a", "b"], per_class=1).parent
    (split / "val").mkdir()  # the split folders, each checked: val/b holds 3 of the junk
    (junk / "b").rename(split / "val" / "b")
    refused("shard", split, out, "--overwrite", match=f"{split}: nothing to shard in val: 3 "
            "files, none a readable image")
    assert snapshot(out) == before


def test_out_may_not_be_the_source_inside_it_or_a_fifo(tmp_path, photos):
    refused("shard", photos, photos, match="is the input")
    refused("shard", photos, photos / "cat" / "shards", match="which is being read")
    refused("shard", photos, tmp_path, match="holds the input")
    os.mkfifo(tmp_path / "fifo")
    refused("shard", photos, tmp_path / "fifo", match="is a FIFO, not a directory")
    assert cli("shard", photos, tmp_path / "t").exit_code == 0
    before = snapshot(tmp_path / "t")
    refused("shard", photos, tmp_path / "t", "--overwrite", "--split", "val", "--classes-from",
            tmp_path / "t", match="is the input")  # would replace the train shards it reads
    assert snapshot(tmp_path / "t") == before
    assert sorted(p.name for p in photos.rglob("*")) == ["0.png", "0.png", "1.png", "1.png",
                                                        "cat", "dog"]


# --- 5. numbers in range ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--shard-size-mb", "nan"], ["--shard-size-mb", "inf"], ["--shard-size-mb", "0"],
    ["--shard-size-mb", "-1"], ["--shard-size-mb", "1e300"], ["--max-per-shard", "0"],
    ["--max-per-shard", "-1"], ["--val-fraction", "nan"], ["--val-fraction", "-0.1"],
    ["--val-fraction", "1"], ["--seed", "-1"], ["--seed", str(2**70)],
    ["--max-bad-fraction", "nan"], ["--max-bad-fraction", "-0.5"], ["--max-bad-fraction", "2"]],
    ids=" ".join)
def test_shard_numbers_out_of_range_are_one_error_line(tmp_path, photos, args):
    refused("shard", photos, tmp_path / "out", *args, match=f"{args[0]} ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["--num-workers", "-1"], ["--num-workers", "100000"], ["--batch-size", "0"],
    ["--batch-size", "-4"], ["--batches", "0"], ["--img-size", "0"], ["--img-size", "99999"],
    ["--task", "train"]], ids=" ".join)
def test_bench_data_numbers_out_of_range_are_one_error_line(args):
    refused("bench-data", *args, match=f"{args[0]} {args[1]}: must be")


# --- 6. a folder whose sub-folders are its splits ----------------------------------------------


def test_a_train_val_folder_is_sharded_as_splits_as_the_readers_read_it(tmp_path):
    root = tmp_path / "pets"
    image_tree(root / "Train", ["cat", "dog", "owl"], per_class=2)
    image_tree(root / "VAL", ["dog", "owl"], per_class=1)  # a class fewer: labels follow train
    res = cli("shard", root, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "train: 6 samples" in res.output and "val: 2 samples" in res.output
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["classes"] == ["cat", "dog", "owl"] and list(index["splits"]) == ["train", "val"]
    written = {split: {k: int(v["cls"]) for k, v in read_shards(tmp_path / "out", split).items()}
               for split in ("train", "val")}
    assert written["val"] == {"dog/0": 1, "owl/0": 2}
    data = data_section(str(root), val=str(root))
    for split in ("train", "val"):  # the folder read in place: the same labels, key by key
        source = resolve_source(getattr(data, split), split)
        assert source.classes == ("cat", "dog", "owl")
        in_place = {str(Path(f).relative_to(root / ("Train" if split == "train" else "VAL"))
                        .with_suffix("")): y for s in source.shards for f, y in s.files}
        assert in_place == written[split]


def test_split_folders_that_do_not_agree_are_refused(tmp_path):
    root = tmp_path / "pets"
    image_tree(root / "train", ["cat", "dog"], per_class=1)
    image_tree(root / "val", ["cat", "emu"], per_class=1)
    refused("shard", root, tmp_path / "o", match="1 of its classes are not among the 2 of the "
            "train data (emu)")
    image_tree(root / "validation", ["cat"], per_class=1)
    refused("shard", root, tmp_path / "o", match="its sub-folders val/ and validation/ both name "
            "the val split")
    refused("shard", root / "train", tmp_path / "o", "--val-fraction", "0.5", "--split", "val",
            match="--split val")
    for d in ("val", "validation"):
        for p in sorted((root / d).rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (root / d).rmdir()
    image_tree(root / "test", ["dog"], per_class=1)
    res = cli("shard", root, tmp_path / "o", "--val-fraction", "0.5")  # val carved from train
    assert res.exit_code == 0, res.output
    assert sorted(json.loads((tmp_path / "o" / "shards.json").read_text())["splits"]) == [
        "test", "train", "val"]
    refused("shard", root, tmp_path / "o2", "--split", "val", match="drop --split")


def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    """Quick twin of the next test: the writer's reader refuses it at once (a read of a
    FIFO would wait for a writer forever; the thread's join bounds the test)."""
    import threading

    from cratemae.data.writer import load_image_file

    os.mkfifo(tmp_path / "pipe.png")
    raised: list[BaseException] = []
    worker = threading.Thread(target=lambda: raised.extend(
        _raises(load_image_file, str(tmp_path / "pipe.png"))), daemon=True)
    worker.start()
    worker.join(5)
    assert raised and "is a FIFO" in str(raised[0])


def _raises(fn, *args) -> list[BaseException]:
    try:
        fn(*args)
    except BadInputError as err:
        return [err]
    return []


@pytest.mark.slow
def test_shard_refuses_a_fifo_among_the_images_and_leaves_nothing(tmp_path):
    """A FIFO named like an image in a class folder blocked `cratemae shard` forever."""
    import subprocess
    import sys

    from data_fixtures import encode, solid

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "0.png").write_bytes(encode(solid(0)))
    os.mkfifo(src / "pipe.png")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "cratemae", "shard", str(src.parent), str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
        f"error: image {src / 'pipe.png'}: is a FIFO, not a regular file; refused"]
    assert not out.exists()
