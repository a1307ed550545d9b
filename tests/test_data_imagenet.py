"""ImageNet as it is downloaded, in miniature: image-net.org's val folder + devkit, Kaggle's
layout, and timm's / Hugging Face's WebDataset tars with `_info.json`. Every image must land
with the label a mapping computed here, independently, gives it: the index of its synset
among the sorted synsets (torchvision's and timm's numbering)."""

from __future__ import annotations

import functools
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import data_section, encode, read_shards, solid, write_tar
from support import cli

import cratemae.data.counts as counts_mod
from cratemae.data.counts import fill_counts
from cratemae.data.loader import build_loader
from cratemae.data.shards import iter_shard
from cratemae.data.sources import resolve_source
from cratemae.errors import BadInputError
from cratemae.eval.labels import class_names

# Leaf synsets with their ILSVRC2012_ID: the ids are NOT in sorted-WNID order, so a label
# taken from the id instead of the sorted position would be caught.
LEAVES = {3: "n01440764", 1: "n01491361", 4: "n01443537", 2: "n01484850"}
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01484850": "great white shark, white shark", "n01491361": "tiger shark"}
# The devkit's other 996 classes (ids 5..1000): their WNIDs sort after the four above, so
# these keep labels 0..3 among the devkit's 1000 classes.
FILLER = {i: f"n{90000000 + i:08d}" for i in range(5, 1001)}
# Inner synsets (num_children > 0) are no classes; n00000001 would sort first.
INNER = {1001: ("n00000001", "fish"), 1002: ("n02000000", "animal")}
SORTED = sorted(LEAVES.values())
DEVKIT_CLASSES = [*SORTED, *sorted(FILLER.values())]
TRUTH = [2, 3, 3, 1, 4, 2, 1, 3, 4, 4, 1]  # ILSVRC2012_ID of val image 1, 2, ...


def expected_label(wnid: str) -> int:
    return sorted(WORDS).index(wnid)


def jpeg(i: int) -> bytes:
    return encode(solid(i, 16), "JPEG", quality=90)


@functools.cache
def meta_mat_bytes(leaves: tuple[tuple[int, str], ...] | None = None) -> bytes:
    """meta.mat as the devkit has it: a `synsets` struct array, one row per synset (the
    fields the readers use); `leaves` (id, WNID) replaces the 1000 leaf rows. Cached: writing
    1000 rows takes a few tenths of a second."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "num_children"]
    leaves = leaves or (*LEAVES.items(), *FILLER.items())
    rows = [(i, w, WORDS.get(w, w), 0) for i, w in leaves]
    rows += [(i, w, words, 2) for i, (w, words) in INNER.items()]
    table = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for f, column in zip(fields, zip(*sorted(rows), strict=True), strict=True):
        table[f][:, 0] = [float(v) if isinstance(v, int) else v for v in column]
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": table})
    return buf.getvalue()


def write_meta_mat(path: Path, leaves: tuple[tuple[int, str], ...] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(meta_mat_bytes(leaves))


def make_devkit(root: Path, *, meta_in_data: bool = True, truth=TRUTH) -> Path:
    write_meta_mat(root / "data" / "meta.mat" if meta_in_data else root / "meta.mat")
    (root / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{t}\n" for t in truth))
    return root


def make_val(root: Path, n: int = len(TRUTH)) -> Path:
    root.mkdir(parents=True)
    for i in range(1, n + 1):
        (root / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg(100 + i))
    return root


def make_train(root: Path, synsets=SORTED, per_class: int = 2) -> Path:
    for c, wnid in enumerate(synsets):
        (root / wnid).mkdir(parents=True)
        for k in range(per_class):
            (root / wnid / f"{wnid}_{k}.JPEG").write_bytes(jpeg(10 * c + k))
    return root


def labels_of(out: Path, split: str) -> dict[str, int]:
    return {k: int(v["cls"]) for k, v in read_shards(out, split).items()}


def val_reference() -> dict[str, int]:
    """Key -> label of the devkit's val images, from the tables above alone."""
    return {f"ILSVRC2012_val_{i:08d}": expected_label(LEAVES[t])
            for i, t in enumerate(TRUTH, start=1)}


def train_reference(synsets=SORTED, per_class: int = 2) -> dict[str, int]:
    return {f"{w}/{w}_{k}": expected_label(w) for w in synsets for k in range(per_class)}


# --- image-net.org: val folder + devkit ---------------------------------------------------


def test_devkit_labels_the_val_folder_as_the_train_folder_numbers_its_synsets(tmp_path):
    train = make_train(tmp_path / "imagenet" / "train")
    val = make_val(tmp_path / "imagenet" / "val")
    devkit = make_devkit(tmp_path / "ILSVRC2012_devkit_t12")
    res = cli("shard", train, tmp_path / "in1k", "--max-per-shard", "3")
    assert res.exit_code == 0, res.output
    res = cli("shard", val, tmp_path / "in1k-val", "--devkit", devkit,
              "--classes-from", tmp_path / "in1k", "--max-per-shard", "4")
    assert res.exit_code == 0, res.output
    assert labels_of(tmp_path / "in1k", "train") == train_reference()
    written = read_shards(tmp_path / "in1k-val", "val")
    assert {k: int(v["cls"]) for k, v in written.items()} == val_reference()
    assert written["ILSVRC2012_val_00000005"]["jpg"] == (val / "ILSVRC2012_val_00000005.JPEG"
                                                         ).read_bytes()
    train_index = json.loads((tmp_path / "in1k" / "shards.json").read_text())
    val_index = json.loads((tmp_path / "in1k-val" / "shards.json").read_text())
    assert val_index["classes"] == train_index["classes"] == SORTED
    assert list(val_index["splits"]) == ["val"]
    assert val_index["class_names"] == [WORDS[w] for w in SORTED]
    assert sorted(p.name for p in (tmp_path / "in1k-val").iterdir()) == [
        "shards.json", "val-000000.tar", "val-000001.tar", "val-000002.tar"]
    # Read back: the recipe's data.val sees the names; the train shards (a class folder) only
    # have the synsets, which the label function falls back to.
    data = data_section(str(tmp_path / "in1k"), val=str(tmp_path / "in1k-val"))
    assert resolve_source(data.val, "val").class_names == tuple(WORDS[w] for w in SORTED)
    assert class_names(data, "val") == tuple(WORDS[w] for w in SORTED)
    assert class_names(data, "train") == tuple(SORTED)


def test_devkit_alone_gives_its_leaf_synsets_and_the_root_form_writes_both_splits(tmp_path):
    val = make_val(tmp_path / "val_only")
    devkit = make_devkit(tmp_path / "devkit", meta_in_data=False)  # meta.mat at the top
    assert cli("shard", val, tmp_path / "a", "--devkit", devkit).exit_code == 0
    index = json.loads((tmp_path / "a" / "shards.json").read_text())
    assert index["classes"] == DEVKIT_CLASSES  # the devkit's 1000, in sorted order
    assert labels_of(tmp_path / "a", "val") == val_reference()

    root = tmp_path / "imagenet"
    make_train(root / "train")
    make_val(root / "val")
    res = cli("shard", root, tmp_path / "b", "--devkit", devkit)
    assert res.exit_code == 0, res.output
    assert "train: 8 samples" in res.output and "val: 11 samples" in res.output
    assert labels_of(tmp_path / "b", "train") == train_reference()
    assert labels_of(tmp_path / "b", "val") == val_reference()
    assert json.loads((tmp_path / "b" / "shards.json").read_text())["class_names"] == [
        WORDS[w] for w in SORTED]


def _refused(tmp_path: Path, args: list, match: str) -> None:
    out = tmp_path / "out"
    res = cli("shard", *args[:1], out, *args[1:])
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and match in res.output, res.output
    assert not out.exists()  # nothing written, not even the folder


def test_a_devkit_that_does_not_fit_the_folder_is_refused(tmp_path):
    val = make_val(tmp_path / "val")
    _refused(tmp_path, [val, "--devkit", make_devkit(tmp_path / "dk1", truth=[*TRUTH, 1])],
             "labels 12 val images but")
    _refused(tmp_path, [make_val(tmp_path / "short", n=len(TRUTH) - 1), "--devkit",
                        make_devkit(tmp_path / "dk2")], "missing: ILSVRC2012_val_00000011.JPEG")
    (val / "ILSVRC2012_val_00000003.JPEG").rename(val / "ILSVRC2012_val_00000099.JPEG")
    _refused(tmp_path, [val, "--devkit", tmp_path / "dk2"], "not in the ground truth")
    bad = make_devkit(tmp_path / "dk3")
    (bad / "data" / "meta.mat").write_bytes(b"MATLAB 5.0 MAT-file, but not really")
    _refused(tmp_path, [make_val(tmp_path / "v3"), "--devkit", bad], "not the devkit's meta.mat")
    (bad / "data" / "meta.mat").unlink()
    _refused(tmp_path, [tmp_path / "v3", "--devkit", bad], "has no meta.mat")
    _refused(tmp_path, [tmp_path / "v3", "--devkit", make_devkit(tmp_path / "dk4",
                                                                truth=[*TRUTH[:-1], 1001])],
             'line 11: "1001" is not a class id 1..1000')  # an inner synset is no class


def test_val_classes_that_train_lacks_are_refused(tmp_path):
    train = make_train(tmp_path / "train", synsets=SORTED[:3])
    devkit = make_devkit(tmp_path / "devkit")
    _refused(tmp_path, [make_val(tmp_path / "val"), "--devkit", devkit, "--classes-from", train],
             f"1 of its classes are not among the 3 of the train data ({SORTED[3]})")
    assert cli("shard", train, tmp_path / "t").exit_code == 0  # the same, from train shards
    _refused(tmp_path, [tmp_path / "val", "--devkit", devkit, "--classes-from", tmp_path / "t"],
             "are not among the 3")


def test_a_class_folder_val_follows_the_train_classes(tmp_path):
    """A val folder already sorted into synset folders, some missing: --classes-from numbers
    them as train does (alone, its 2 folders would be labels 0 and 1)."""
    assert cli("shard", make_train(tmp_path / "train"), tmp_path / "t").exit_code == 0
    val = make_train(tmp_path / "val", synsets=[SORTED[1], SORTED[3]], per_class=1)
    res = cli("shard", val, tmp_path / "v", "--classes-from", tmp_path / "t", "--split", "val")
    assert res.exit_code == 0, res.output
    assert labels_of(tmp_path / "v", "val") == train_reference([SORTED[1], SORTED[3]], 1)
    assert json.loads((tmp_path / "v" / "shards.json").read_text())["classes"] == SORTED
    data = data_section(str(tmp_path / "t"), val=str(tmp_path / "v"))
    assert resolve_source(data.val, "val").classes == tuple(SORTED)  # its val split
    help_text = cli("shard", "--help").output
    assert "--devkit" in help_text and "--classes-from" in help_text


def test_without_scipy_meta_mat_asks_for_it(tmp_path, monkeypatch):
    val, devkit = make_val(tmp_path / "val"), make_devkit(tmp_path / "devkit")
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy.io now raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    _refused(tmp_path, [val, "--devkit", devkit], "pip install scipy")


# --- Kaggle's layout -----------------------------------------------------------------------


def make_kaggle(root: Path, val_synsets: list[str] | None = None, train=SORTED) -> Path:
    make_train(root / "ILSVRC" / "Data" / "CLS-LOC" / "train", synsets=train)
    val = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    val.mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for i, wnid in enumerate(val_synsets or [LEAVES[t] for t in TRUTH], start=1):
        name = f"ILSVRC2012_val_{i:08d}"
        (val / f"{name}.JPEG").write_bytes(jpeg(200 + i))
        rows.append(f"{name},{wnid} 10 20 100 120 {wnid} 5 5 50 50 ")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows[:1] + rows[:0:-1]) + "\n")
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {WORDS[w]}\n" for w in reversed(SORTED)))
    return root


def test_kaggle_root_becomes_train_and_val_shards(tmp_path):
    root = make_kaggle(tmp_path / "imagenet-object-localization-challenge")
    res = cli("shard", root, tmp_path / "out", "--max-per-shard", "5")
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "shards.json", "train-000000.tar", "train-000001.tar",
        "val-000000.tar", "val-000001.tar", "val-000002.tar"]
    assert labels_of(out, "train") == train_reference()
    assert labels_of(out, "val") == val_reference()
    index = json.loads((out / "shards.json").read_text())
    assert index["classes"] == SORTED and index["class_names"] == [WORDS[w] for w in SORTED]
    data = data_section(str(out), val=str(out))
    assert class_names(data) == class_names(data, "val") == tuple(WORDS[w] for w in SORTED)
    got = [int(y) for b in build_loader(data, split="val", augment="none", img_size=16, seed=0,
                                        epoch=0) for y in b.labels]
    assert sorted(got) == sorted(val_reference().values())


def test_kaggle_root_is_read_in_place(tmp_path):
    root = make_kaggle(tmp_path / "kaggle")
    data = data_section(str(root), val=str(root), shuffle_buffer=0)
    val = resolve_source(data.val, "val")
    labels = {Path(f).stem: y for s in val.shards for f, y in s.files}
    assert labels == val_reference() and val.classes == tuple(SORTED)
    train = resolve_source(data.train, "train")
    assert {f"{Path(f).parent.name}/{Path(f).stem}": y for s in train.shards
            for f, y in s.files} == train_reference()
    assert class_names(data, "val") == tuple(WORDS[w] for w in SORTED)
    got = [int(y) for b in build_loader(data, split="val", augment="none", img_size=16, seed=0,
                                        epoch=0) for y in b.labels]
    assert sorted(got) == sorted(val_reference().values())


def test_kaggle_val_that_does_not_fit_is_refused(tmp_path):
    root = make_kaggle(tmp_path / "k1", train=SORTED[:3])  # val has the 4th synset
    _refused(tmp_path, [root], f"are not among the 3 of the train data ({SORTED[3]})")
    root = make_kaggle(tmp_path / "k2")
    extra = root / "ILSVRC" / "Data" / "CLS-LOC" / "val" / "ILSVRC2012_val_00000077.JPEG"
    extra.write_bytes(jpeg(1))
    _refused(tmp_path, [root], "no label for")
    extra.unlink()
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nILSVRC2012_val_1,\n")
    _refused(tmp_path, [root], "not Kaggle's ImageId,PredictionString table")


# --- timm's / Hugging Face's WebDataset tars with _info.json ---------------------------------


def make_wds(root: Path, counts: dict[str, list[int]], info: bool = True,
             features: bool = False) -> dict[str, dict[str, int]]:
    """`imagenet1k-{split}-NNNN.tar` of KEY.jpg/.cls/.json; -> split -> key -> label."""
    root.mkdir(parents=True)
    splits, want, j = {}, {}, 0
    for split, sizes in counts.items():
        names, want[split] = [], {}
        for s, n in enumerate(sizes):
            members = []
            for _ in range(n):
                wnid = SORTED[j % 4]
                key = f"{wnid}_{j}"
                members += [(f"{key}.jpg", jpeg(SPACING * j)),
                            (f"{key}.cls", b"%d" % expected_label(wnid)),
                            (f"{key}.json", json.dumps({"filename": f"{key}.JPEG"}).encode())]
                want[split][key] = expected_label(wnid)
                j += 1
            names.append(write_tar(root / f"imagenet1k-{split}-{s:04d}.tar", members).name)
        splits[split] = {"name": split, "num_samples": sum(sizes), "filenames": names,
                         "shard_lengths": sizes}
    if info:
        doc: dict = {"name": "imagenet-1k", "splits": splits}
        if features:
            doc["features"] = {"cls": {"_type": "ClassLabel", "names": [WORDS[w] for w in SORTED]}}
        (root / "_info.json").write_text(json.dumps(doc))
    return want


SPACING = 28  # sample j's image has red = 28 j (j <= 9): told apart after JPEG and resizing


@pytest.fixture
def no_counting(monkeypatch):
    """Any counting pass over the tars fails the test."""
    def refuse(url):
        raise AssertionError(f"counted {url}")

    monkeypatch.setattr(counts_mod, "count_tar_samples", refuse)
    monkeypatch.setattr(counts_mod, "count_stream_samples", refuse)


def test_wds_folder_with_info_json_is_read_without_counting(tmp_path, no_counting):
    want = make_wds(tmp_path / "wds", {"train": [5, 4, 6], "validation": [3, 4]}, features=True)
    data = data_section(str(tmp_path / "wds"), val=str(tmp_path / "wds"), shuffle_buffer=0)
    train = resolve_source(data.train, "train")
    assert [(Path(s.url).name, s.count) for s in train.shards] == [
        ("imagenet1k-train-0000.tar", 5), ("imagenet1k-train-0001.tar", 4),
        ("imagenet1k-train-0002.tar", 6)]
    assert fill_counts(train) is train  # nothing left to count
    assert train.class_names == tuple(WORDS[w] for w in SORTED) and train.classes is None
    assert class_names(data, "val") == tuple(WORDS[w] for w in SORTED)
    val = resolve_source(data.val, "val")  # "validation" is data.val
    assert [s.count for s in val.shards] == [3, 4]
    kw = dict(augment="none", img_size=16, seed=0, epoch=0)
    got = sorted(int(y) for b in build_loader(data, split="val", **kw) for y in b.labels)
    assert got == sorted(want["validation"].values())
    assert len(build_loader(data, split="train", **kw)) == 4  # ceil(15 / 4): all 3 tars
    sample = next(iter_shard(val.shards[0], 0, 1))
    assert set(sample.parts) == {"jpg", "cls", "json"}  # the sidecar is carried along
    # A glob of some of the tars takes its counts from _info.json too.
    part = resolve_source(str(tmp_path / "wds" / "imagenet1k-train-000[02].tar"), "train")
    assert [s.count for s in part.shards] == [5, 6]


def test_wds_labels_reach_the_loader_key_by_key(tmp_path, no_counting):
    """Each sample's label, read through the loader's decoding (.jpg + .cls), is the one
    its synset gives, matched by the image itself (red channel = 28 x sample number)."""
    want = make_wds(tmp_path / "wds", {"train": [3], "validation": [4, 2]})
    data = data_section(str(tmp_path / "wds"), val=str(tmp_path / "wds"), batch_size=2,
                        shuffle_buffer=0)
    seen = {}
    for b in build_loader(data, split="val", augment="none", img_size=16, seed=0, epoch=0):
        for img, y in zip(b.model_input("cpu"), b.labels, strict=True):
            red = float(img[0].mean() * data.std[0] + data.mean[0]) * 255  # undo normalize
            seen[round(red / SPACING)] = int(y)
    assert len(seen) == 6
    assert {f"{SORTED[j % 4]}_{j}": y for j, y in seen.items()} == want["validation"]


def test_wds_folder_without_info_json_keeps_its_splits_apart(tmp_path):
    want = make_wds(tmp_path / "wds", {"train": [3, 2], "validation": [4]}, info=False)
    val = fill_counts(resolve_source(str(tmp_path / "wds"), "val"))
    assert [Path(s.url).name for s in val.shards] == ["imagenet1k-validation-0000.tar"]
    assert val.shards[0].count == len(want["validation"]) == 4  # counted: nothing gave it
    train = resolve_source(str(tmp_path / "wds"), "train")
    assert len(train.shards) == 2


def test_wds_info_json_naming_absent_tars_or_no_such_split(tmp_path):
    make_wds(tmp_path / "wds", {"train": [3, 2]})
    (tmp_path / "wds" / "imagenet1k-train-0001.tar").unlink()
    with pytest.raises(BadInputError, match=r"1 of the 2 train tars listed in .*are missing"):
        resolve_source(str(tmp_path / "wds"), "train")
    with pytest.raises(BadInputError, match=r"has no 'val' split \(it has: train\)"):
        resolve_source(str(tmp_path / "wds"), "val")
