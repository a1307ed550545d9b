"""Hugging Face Parquet data sets: miniatures written with pyarrow as `huggingface-cli
download` leaves them (the Image feature's {bytes, path} struct or a binary column, an
integer label column, class names in README.md's front matter or dataset_infos.json, the
split in each file's name, several row groups), sharded in-process, every sample's label and
pixels checked. Skipped, with the reason, where pyarrow is absent (CI installs it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import encode, solid
from test_transfer_cifar import assert_same, read_shards

from cratemae.data.layouts import DownloadOptions
from cratemae.data.writer import write_shards
from cratemae.errors import BadInputError

pa = pytest.importorskip("pyarrow", reason="pyarrow (the cratemae[parquet] extra) is absent")
pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow (cratemae[parquet]) is absent")

NAMES = ("airplane", "automobile", "bird", "cat", "deer")
README = """---
license: unknown
dataset_info:
  config_name: plain_text
  features:
  - name: img
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names}
  splits:
  - name: train
    num_examples: 7
---
# A miniature
"""


def rows(split: str, n: int) -> list[tuple[np.ndarray, bytes, int]]:
    """(pixels, PNG bytes, label) of n samples."""
    base = 0 if split == "train" else 100
    out = []
    for i in range(n):
        img = solid(base + 7 * i)
        out.append((np.asarray(img), encode(img), (3 * i + base) % len(NAMES)))
    return out


def write_file(path: Path, samples, image: str = "img", struct: bool = True,
               extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = [b for _, b, _ in samples]
    col = (pa.array([{"bytes": b, "path": None} for b in data],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
           if struct else pa.array(data, pa.binary()))
    table = pa.table({image: col, "label": pa.array([y for *_, y in samples], pa.int64()),
                      **(extra or {})})
    pq.write_table(table, path, row_group_size=3)


def write_hf(root: Path) -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    """cifar10-like: plain_text/{train,test}-00000-of-00001.parquet and a README."""
    names = "\n".join(f"          '{i}': {n}" for i, n in enumerate(NAMES))
    root.mkdir(parents=True)
    (root / "README.md").write_text(README.format(names=names))
    want = {}
    for split, n in (("train", 7), ("test", 4)):
        samples = rows(split, n)
        write_file(root / "plain_text" / f"{split}-00000-of-00001.parquet", samples)
        want[split] = {f"plain_text/{split}-00000-of-00001/{i:06d}": (p, y)
                       for i, (p, _, y) in enumerate(samples)}
    return want


def test_parquet_shards_hold_every_label_and_pixel(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf")
    summary = write_shards(tmp_path / "hf", tmp_path / "out", max_per_shard=4)
    assert summary.layout.startswith("Hugging Face Parquet (2 files; images: img, labels: label")
    assert_same(read_shards(tmp_path / "out"), want)
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["classes"] == list(NAMES)


def test_parquet_is_read_one_row_group_at_a_time(tmp_path: Path) -> None:
    from cratemae.data import parquet

    write_hf(tmp_path / "hf")
    parquet._row_group.cache_clear()
    write_shards(tmp_path / "hf", tmp_path / "out")
    assert parquet._row_group.cache_info().misses == 3 + 2  # 7 rows in 3s, 4 rows in 3s


def test_binary_images_and_names_from_dataset_infos(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    samples = rows("train", 5)
    write_file(root / "data" / "train-00000-of-00002.parquet", samples[:2], "image", False)
    write_file(root / "data" / "train-00001-of-00002.parquet", samples[2:], "image", False)
    write_file(root / "data" / "validation-00000-of-00001.parquet", rows("val", 2), "image",
               False)
    infos = {"default": {"features": {"image": {"_type": "Image"},
                                      "label": {"names": list(NAMES), "_type": "ClassLabel"}}}}
    (root / "dataset_infos.json").write_text(json.dumps(infos))
    write_shards(root, tmp_path / "out")
    got = read_shards(tmp_path / "out")
    assert sorted(got) == ["train", "val"]
    want = {f"data/train-0000{0 if i < 2 else 1}-of-00002/{i if i < 2 else i - 2:06d}": (p, y)
            for i, (p, _, y) in enumerate(samples)}
    assert_same({"train": got["train"]}, {"train": want})
    assert json.loads((tmp_path / "out" / "shards.json").read_text())["classes"] == list(NAMES)


def test_a_label_column_among_several_integers_is_found_or_named(tmp_path: Path) -> None:
    samples = rows("train", 3)
    extra = {"coarse_label": pa.array([9, 8, 7], pa.int64())}
    write_file(tmp_path / "a" / "train.parquet", samples, extra=extra)
    write_shards(tmp_path / "a", tmp_path / "o1")  # "label" wins
    assert sorted(y for _, y in read_shards(tmp_path / "o1")["train"].values()) == sorted(
        y for *_, y in samples)
    write_shards(tmp_path / "a", tmp_path / "o2",
                 options=DownloadOptions(label_column="coarse_label"))
    assert sorted(y for _, y in read_shards(tmp_path / "o2")["train"].values()) == [7, 8, 9]
    t = pq.read_table(tmp_path / "a" / "train.parquet").rename_columns(["img", "fine", "coarse"])
    pq.write_table(t, tmp_path / "b.parquet")
    (tmp_path / "b").mkdir()
    (tmp_path / "b.parquet").rename(tmp_path / "b" / "train-0.parquet")
    with pytest.raises(BadInputError, match=r"several integer columns \(fine, coarse\): name "
                       "the labels with --label-column"):
        write_shards(tmp_path / "b", tmp_path / "o3")


def test_parquet_without_an_image_column_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}),
                   tmp_path / "hf" / "train-00000-of-00001.parquet")
    with pytest.raises(BadInputError, match=r"train-00000-of-00001\.parquet: has no image column"
                       r" \(a struct with bytes, or binary\); its columns: text \(string\)"):
        write_shards(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_label_past_the_class_names_is_refused(tmp_path: Path) -> None:
    write_hf(tmp_path / "hf")
    readme = tmp_path / "hf" / "README.md"
    readme.write_text(readme.read_text().replace("          '4': deer\n", ""))
    with pytest.raises(BadInputError, match=r"has label 4, past the 4 class names"):
        write_shards(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_image_is_a_skipped_sample(tmp_path: Path) -> None:
    samples = rows("train", 3)
    samples[1] = (samples[1][0], b"\x89PNG garbage", samples[1][2])
    write_file(tmp_path / "hf" / "train.parquet", samples)
    summary = write_shards(tmp_path / "hf", tmp_path / "out", max_bad_fraction=0.5)
    assert summary.samples("train") == 2
    assert [f for f, _ in summary.skipped] == [f"{tmp_path / 'hf' / 'train.parquet'} row 1"]


def test_without_pyarrow_the_error_names_the_extra(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    write_hf(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    with pytest.raises(BadInputError, match=r"needs pyarrow: pip install 'cratemae\[parquet\]'"):
        write_shards(tmp_path / "hf", tmp_path / "out")


def test_one_parquet_file_with_named_columns_and_an_empty_image(tmp_path: Path) -> None:
    samples = rows("train", 3)
    extra = {"thumb": pa.array([b"x"] * 3, pa.binary())}  # a second binary column
    write_file(tmp_path / "train-00000-of-00001.parquet", samples, extra=extra)
    src = tmp_path / "train-00000-of-00001.parquet"
    with pytest.raises(BadInputError, match=r"several image columns \(img, thumb\): name one "
                       "with --image-column"):
        write_shards(src, tmp_path / "out")
    t = pq.read_table(src)
    col = t.column("img").combine_chunks()
    nulled = pa.StructArray.from_arrays(
        [pa.array([col.field("bytes")[0].as_py(), None, col.field("bytes")[2].as_py()],
                  pa.binary()), col.field("path")], ["bytes", "path"])
    pq.write_table(t.set_column(0, "img", nulled), src)
    summary = write_shards(src, tmp_path / "out", options=DownloadOptions(image_column="img"),
                           max_bad_fraction=0.5)
    got = read_shards(tmp_path / "out")["train"]
    want = {f"train-00000-of-00001/{i:06d}": (p, y) for i, (p, _, y) in enumerate(samples)
            if i != 1}
    assert_same({"train": got}, {"train": want})
    assert summary.skipped == [(f"{src} row 1", "no image bytes in its row")]


@pytest.mark.parametrize(("label", "extra", "match"), [
    (pa.array([0.0, 1.0, 2.0]), {}, r"its column label is double, not integer labels"),
    # strings beside an integer id: the ids are no labels
    (pa.array(["cat", "dog", "cat"]), {"id": pa.array([7, 8, 9])}, r"its column label is "
     r"string, not integer labels; name the label column with --label-column"),
], ids=["floats", "strings-beside-an-id"])
def test_a_label_column_that_is_not_integers_is_refused(tmp_path: Path, label, extra,
                                                        match: str) -> None:
    samples = rows("train", 3)
    write_file(tmp_path / "hf" / "train-0.parquet", samples, extra=extra)
    t = pq.read_table(tmp_path / "hf" / "train-0.parquet")
    pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", label),
                   tmp_path / "hf" / "train-0.parquet")
    with pytest.raises(BadInputError, match=match):
        write_shards(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pandas_index_is_no_label_column(tmp_path: Path) -> None:
    samples = rows("train", 3)
    write_file(tmp_path / "hf" / "train-0.parquet", samples)
    t = pq.read_table(tmp_path / "hf" / "train-0.parquet")
    pq.write_table(t.drop(["label"]).append_column("__index_level_0__", pa.array([0, 1, 2])),
                   tmp_path / "hf" / "train-0.parquet")
    summary = write_shards(tmp_path / "hf", tmp_path / "out")
    assert "labels: none, unlabelled" in summary.layout and summary.classes is None


def _readme_names(root: Path, lines: str) -> None:
    readme = root / "README.md"
    text = readme.read_text()
    start = text.index("        names:\n") + len("        names:\n")
    readme.write_text(text[:start] + lines + text[text.index("  splits:"):])


def test_class_names_with_a_gap_or_a_name_twice(tmp_path: Path) -> None:
    want = write_hf(tmp_path / "hf")
    # '2' missing: bird would name label 2, cat label 3... the names are left out instead
    _readme_names(tmp_path / "hf", "".join(f"          '{i}': {NAMES[i]}\n"
                                           for i in (0, 1, 3, 4, 5) if i < len(NAMES)) +
                  "          '5': extra\n")
    write_shards(tmp_path / "hf", tmp_path / "out")
    assert_same(read_shards(tmp_path / "out"), want)
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["classes"] == ["0", "1", "2", "3", "4"]
    _readme_names(tmp_path / "hf", "".join(f"          '{i}': {n}\n" for i, n in
                                           enumerate([*NAMES[:4], "airplane"])))
    with pytest.raises(BadInputError, match=r"its metadata names two classes 'airplane'"):
        write_shards(tmp_path / "hf", tmp_path / "o2")


@pytest.mark.parametrize(("make", "match"), [
    (lambda d: os.mkfifo(d / "train-00000-of-00001.parquet"),
     r"train-00000-of-00001\.parquet: is a FIFO, not a regular file"),
    (lambda d: write_file(d / "train-00000-of-00001.parquet", []),
     r"its train files hold no rows"),
    (lambda d: write_file(d / "train_unlabeled-00000-of-00001.parquet", rows("train", 2)),
     r"its split train_unlabeled is none of train, validation, test"),
], ids=["fifo", "no-rows", "another-split"])
def test_a_split_is_never_dropped_or_merged_silently(tmp_path: Path, make, match: str) -> None:
    root = tmp_path / "hf"
    write_file(root / "test-00000-of-00001.parquet", rows("test", 2))
    make(root)
    with pytest.raises(BadInputError, match=match):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_numbered_file_gives_its_split(tmp_path: Path) -> None:
    write_file(tmp_path / "hf" / "train_0.parquet", rows("train", 2))
    write_file(tmp_path / "hf" / "validation_1.parquet", rows("val", 2))
    assert sorted(write_shards(tmp_path / "hf", tmp_path / "out").splits) == ["train", "val"]


def test_a_file_of_a_split_in_several_parts_missing_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "hf"
    samples = rows("train", 5)
    write_file(root / "data" / "train-00000-of-00003.parquet", samples[:2])
    write_file(root / "data" / "train-00002-of-00003.parquet", samples[2:])
    with pytest.raises(BadInputError, match=r"data: holds 2 files train-\*-of-\*\.parquet, not "
                       r"the 3 their names count \(train-00001-of-00003\.parquet missing\)"):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_split_whose_files_lie_in_two_configs_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "hf"  # two configs of one repository, each with its classes
    write_file(root / "cifar10" / "train-00000-of-00001.parquet", rows("train", 2))
    write_file(root / "cifar100" / "train-00000-of-00001.parquet", rows("train", 2))
    (root / "README.md").write_text("# two configs\n")
    with pytest.raises(BadInputError, match=r"the train files lie in several folders \(.*"
                       r"cifar10, .*cifar100\), configs of the data set\? give the folder of one"):
        write_shards(root, tmp_path / "out")
    assert sorted(write_shards(root / "cifar10", tmp_path / "out").splits) == ["train"]


def test_a_fifo_named_readme_is_refused_not_read_as_folders(tmp_path: Path) -> None:
    write_hf(tmp_path / "hf")  # plain_text/*.parquet: found by the README beside it
    (tmp_path / "hf" / "README.md").unlink()
    os.mkfifo(tmp_path / "hf" / "README.md")
    with pytest.raises(BadInputError, match=r"README\.md: is a FIFO, not a regular file"):
        write_shards(tmp_path / "hf", tmp_path / "out")
