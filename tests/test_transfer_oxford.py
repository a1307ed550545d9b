"""Oxford Flowers-102 and Oxford-IIIT Pets as downloaded: miniatures with the originals'
files (jpg/ with imagelabels.mat and setid.mat written by scipy; images/ with the
annotation lists), sharded in-process, every sample's label and pixels checked against
what the test wrote; hostile metadata refused before a byte is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import encode, solid
from PIL import Image
from test_transfer_cifar import assert_same, read_shards

from cratemae.data.writer import write_shards
from cratemae.errors import BadInputError

scipy_io = pytest.importorskip("scipy.io", reason="the .mat files are written with scipy")

# --- Flowers-102 -----------------------------------------------------------------------------

FLOWER_CLASSES = [5, 1, 102, 77, 5, 2, 60, 1, 3]  # imagelabels.mat: image i+1 has class [i]
SETID = {"trnid": [1, 4, 9], "valid": [2, 6], "tstid": [3, 5, 8]}  # image 7 in no split


def write_flowers(root: Path, labels=FLOWER_CLASSES, setid=SETID) -> Path:
    (root / "jpg").mkdir(parents=True)
    for i in range(1, len(labels) + 1):
        (root / "jpg" / f"image_{i:05d}.jpg").write_bytes(encode(solid(i * 20), "JPEG"))
    # As the originals hold them: 1 x N rows of doubles.
    scipy_io.savemat(root / "imagelabels.mat", {"labels": np.array([labels], np.float64)})
    scipy_io.savemat(root / "setid.mat", {k: np.array([v], np.float64) for k, v in setid.items()})
    return root


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_flowers_splits_are_setids_labels_are_imagelabels_minus_one(tmp_path: Path) -> None:
    root = write_flowers(tmp_path / "dl" / "flowers-102")
    summary = write_shards(tmp_path / "dl", tmp_path / "out")  # holds flowers-102/
    assert summary.layout == "Oxford Flowers-102"
    want = {split: {f"image_{i:05d}": (pixels_of(root / "jpg" / f"image_{i:05d}.jpg"),
                                       FLOWER_CLASSES[i - 1] - 1) for i in SETID[key]}
            for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid"))}
    assert_same(read_shards(tmp_path / "out"), want)
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert len(index["classes"]) == 102 and index["classes"][0] == "pink primrose"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [
        "test-000000.tar", "train-000000.tar", "val-000000.tar"]


def test_a_flowers_image_listed_but_missing_is_a_skipped_sample(tmp_path: Path) -> None:
    root = write_flowers(tmp_path / "f")
    (root / "jpg" / "image_00004.jpg").unlink()
    summary = write_shards(root, tmp_path / "out", max_bad_fraction=0.5)
    assert summary.samples("train") == 2
    assert [Path(f).name for f, _ in summary.skipped] == ["image_00004.jpg"]


@pytest.mark.parametrize(("labels", "setid", "match"), [
    (FLOWER_CLASSES, {**SETID, "tstid": [3, 10]},
     r"setid\.mat: its tstid lists image 10, past the 9 images of imagelabels\.mat"),
    ([*FLOWER_CLASSES[:-1], 103], SETID, r"imagelabels\.mat: image 9 has class 103, outside "
     r"1\.\.102"),
    (FLOWER_CLASSES, {**SETID, "valid": [0]}, r"its valid lists image 0"),
    (FLOWER_CLASSES, {**SETID, "tstid": [3, 5, 8, 1]},  # a train image tested on too
     r"setid\.mat: image 1 is in trnid and in tstid"),
    (FLOWER_CLASSES, {**SETID, "trnid": [1, 4, 9, 4]}, r"setid\.mat: image 4 is in trnid twice"),
], ids=["past-the-images", "class-103", "image-0", "splits-overlap", "an-image-twice"])
def test_flowers_metadata_that_does_not_fit_is_refused(tmp_path: Path, labels, setid,
                                                       match: str) -> None:
    root = write_flowers(tmp_path / "f", labels, setid)
    with pytest.raises(BadInputError, match=match):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_imagelabels_shorter_than_the_jpg_folder_is_refused(tmp_path: Path) -> None:
    root = write_flowers(tmp_path / "f", setid={"trnid": [1], "valid": [2], "tstid": [3]})
    # One label lost: the images after it would take their neighbours' labels.
    scipy_io.savemat(root / "imagelabels.mat",
                     {"labels": np.array([FLOWER_CLASSES[:8]], np.float64)})
    with pytest.raises(BadInputError, match=r"imagelabels\.mat: labels 8 images, but jpg/ holds "
                       r"image_00009\.jpg"):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- Oxford-IIIT Pets ------------------------------------------------------------------------

TRAINVAL = [("Abyssinian_1", 1), ("american_bulldog_10", 2), ("Abyssinian_2", 1),
            ("yorkshire_terrier_7", 37), ("great_pyrenees_3", 20)]
TEST = [("american_bulldog_11", 2), ("yorkshire_terrier_8", 37), ("Abyssinian_9", 1)]


def write_pets(root: Path, trainval=TRAINVAL, test=TEST) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for n, (name, _) in enumerate([*trainval, *test]):
        image = root / "images" / f"{name}.jpg"
        image.parent.mkdir(parents=True, exist_ok=True)  # a hostile name may hold a path
        image.write_bytes(encode(solid(n * 30), "JPEG"))
    for file, rows in (("trainval.txt", trainval), ("test.txt", test)):
        species = {1: 1, 20: 2, 37: 2}
        (root / "annotations" / file).write_text("".join(
            f"{name} {cid} {species.get(cid, 2)} {cid}\n" for name, cid in rows))
    return root


def test_pets_labels_are_class_id_minus_one_names_from_file_names(tmp_path: Path) -> None:
    root = write_pets(tmp_path / "dl" / "oxford-iiit-pet")
    summary = write_shards(tmp_path / "dl", tmp_path / "out")  # torchvision's root
    assert summary.layout.startswith("Oxford-IIIT Pets")
    want = {split: {name: (pixels_of(root / "images" / f"{name}.jpg"), cid - 1)
                    for name, cid in rows} for split, rows in (("train", TRAINVAL),
                                                               ("test", TEST))}
    assert_same(read_shards(tmp_path / "out"), want)
    classes = json.loads((tmp_path / "out" / "shards.json").read_text())["classes"]
    assert len(classes) == 37
    assert (classes[0], classes[1], classes[19], classes[36]) == (
        "Abyssinian", "american_bulldog", "great_pyrenees", "yorkshire_terrier")


def test_pets_missing_and_corrupt_images_are_skipped_samples(tmp_path: Path) -> None:
    root = write_pets(tmp_path / "p")
    (root / "images" / "Abyssinian_9.jpg").unlink()
    (root / "images" / "yorkshire_terrier_8.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    # more than data.max_bad_fraction's 1% by default: refused, naming the count and the
    # first, and nothing is written
    with pytest.raises(BadInputError, match=r"p: test: 2 of 3 listed images are missing or "
                       r"unreadable \(66\.7%, more than --max-bad-fraction 0\.01\); the "
                       r"first: .*Abyssinian_9\.jpg: unreadable"):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # at the limit is within it: 2 of 3 is 0.6666666666666666 (2 / 3 as a float)
    summary = write_shards(root, tmp_path / "out", max_bad_fraction=2 / 3)
    assert summary.samples("test") == 1 and summary.samples("train") == 5
    assert sorted(Path(f).name for f, _ in summary.skipped) == [
        "Abyssinian_9.jpg", "yorkshire_terrier_8.jpg"]


@pytest.mark.parametrize(("test", "match"), [
    ([*TEST, ("Bengal_1", 38)], r'test\.txt: line 4: "Bengal_1 38 2 38" is not "NAME CLASS_ID '
     r'SPECIES BREED_ID" with CLASS_ID in 1\.\.37'),
    ([("Abyssinian_3", 2)], r"class 2 holds american_bulldog_10 and Abyssinian_3"),
    ([*TEST, ("Abyssinian_2", 1)], r"Abyssinian_2 is listed in trainval\.txt and test\.txt"),
    ([*TEST, ("Abyssinian_9", 1)], r"Abyssinian_9 is listed in test\.txt twice"),
    ([*TEST, ("Abyssinian_5", 3)], r"classes 1 and 3 both hold Abyssinian images"),
    ([*TEST, ("../x/Abyssinian_5", 1)], r'line 4: "\.\./x/Abyssinian_5" is not the name of an'),
    ([*TEST, ("Abyssinian_5.5", 1)], r'line 4: "Abyssinian_5\.5" is not the name of an image'),
], ids=["class-38", "class-and-breed-disagree", "in-both-splits", "listed-twice",
        "two-classes-one-breed", "a-path", "a-dot"])
def test_pets_annotations_that_do_not_fit_are_refused(tmp_path: Path, test, match) -> None:
    root = write_pets(tmp_path / "p", test=test)
    with pytest.raises(BadInputError, match=match):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_layout_forces_a_format_and_says_what_is_missing(tmp_path: Path) -> None:
    from cratemae.data.layouts import DownloadOptions

    root = write_pets(tmp_path / "p")
    for name, match in (("flowers102", "holds no jpg/, imagelabels.mat and setid.mat"),
                        ("cifar10-binary", "--layout cifar10-binary: holds no test_batch.bin"),
                        ("nope", "--layout nope: unknown; the layouts are folders, ")):
        with pytest.raises(BadInputError, match=match):
            write_shards(root, tmp_path / "out", options=DownloadOptions(layout=name))
    summary = write_shards(root, tmp_path / "out", options=DownloadOptions(layout="folders"))
    assert summary.layout is None and summary.classes == ("annotations", "images")


def test_a_folder_holding_two_downloads_asks_for_one(tmp_path: Path) -> None:
    from cratemae.data.layouts import DownloadOptions, read_in_place

    write_flowers(tmp_path / "data" / "flowers-102")
    write_pets(tmp_path / "data" / "oxford-iiit-pet")
    match = (r"data: holds several downloads \(Flowers-102, Oxford-IIIT Pets\); give the "
             "folder of one, or name its layout with --layout")
    with pytest.raises(BadInputError, match=match):
        write_shards(tmp_path / "data", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BadInputError, match=match):
        read_in_place(tmp_path / "data", "train")
    summary = write_shards(tmp_path / "data", tmp_path / "out",
                           options=DownloadOptions(layout="pets"))
    assert summary.layout.startswith("Oxford-IIIT Pets")


@pytest.mark.parametrize(("write", "gone", "match"), [
    (write_flowers, "setid.mat", r"f: Flowers-102 without its setid\.mat"),
    (write_pets, "annotations/test.txt", r"f: Oxford-IIIT Pets without its annotations/test\.txt"),
], ids=["flowers-setid", "pets-test-list"])
def test_a_download_missing_a_list_says_so(tmp_path: Path, write, gone: str, match: str) -> None:
    root = write(tmp_path / "f")
    (root / gone).unlink()  # not read as class folders jpg/ or images/ and annotations/
    with pytest.raises(BadInputError, match=match):
        write_shards(root, tmp_path / "out")
    os.mkfifo(root / gone)
    with pytest.raises(BadInputError, match=f"{gone}: is a FIFO, not a regular file"):
        write_shards(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_split_at_the_limit_of_missing_images_is_within_it() -> None:
    """29 of 100 listed images missing at --max-bad-fraction 0.29 is within the limit (as a
    product, 0.29 * 100 is 28.999999999999996, and the split was refused), 30 is not."""
    from cratemae.data.writer import Item, ShardSummary, _check_written

    items = [Item(f"k{i}", 0, lambda: ("jpg", b""), f"f{i}") for i in range(100)]
    for missing, refused in ((29, False), (30, True)):
        summary = ShardSummary(Path("out"), {"train": [("train-000000.tar", 100 - missing)]},
                               None, skipped=[(f"f{i}", "gone") for i in range(missing)])
        if refused:
            with pytest.raises(BadInputError, match=r"30 of 100 listed images"):
                _check_written(summary, {"train": items}, "src", 0.29)
        else:
            _check_written(summary, {"train": items}, "src", 0.29)
