"""Lying data layouts: an ImageNet devkit whose meta.mat does not hold ILSVRC-2012's 1000
classes, a ground truth with a non-id, Kaggle's layout with a file missing or a row listed
twice, counts in `shards.json` / `_info.json` that are no whole numbers. Each is one
`error:` line naming the file (and line or key), exit 2, never a shifted label."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from data_fixtures import make_shards
from support import cli
from test_data_imagenet import (
    FILLER,
    LEAVES,
    SORTED,
    TRUTH,
    WORDS,
    labels_of,
    make_devkit,
    make_kaggle,
    make_train,
    make_val,
    train_reference,
    val_reference,
    write_meta_mat,
)

import cratemae.data.imagenet as imagenet_mod
from cratemae.data.sources import resolve_source
from cratemae.errors import BadInputError


def refused(args: list, match: str) -> str:
    """`cratemae shard ARGS` exits 2 with one `error:` line holding `match`."""
    res = cli("shard", *args)
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and match in res.output, res.output
    assert "Traceback" not in res.output
    return res.output


# --- 1. the devkit ---------------------------------------------------------------------------


def test_a_meta_mat_without_1000_distinct_leaves_is_refused_not_shifted(tmp_path):
    val = make_val(tmp_path / "val")
    leaves = (*LEAVES.items(), *FILLER.items())
    dupe = make_devkit(tmp_path / "dupe")  # today: 4 leaves, id 4 listed twice, were 3 classes
    write_meta_mat(dupe / "data" / "meta.mat",
                   tuple((4 if i == 2 else i, w) for i, w in LEAVES.items()))
    out = refused([val, tmp_path / "o", "--devkit", dupe], "meta.mat: its synsets table has "
                  "4 leaf synsets (classes), not ILSVRC-2012's 1000 with ids 1..1000")
    assert "ids listed twice: 4" in out and "ids missing: 2, 5, 6" in out
    assert not (tmp_path / "o").exists()
    ids, wnids = [i for i, _ in leaves], [w for _, w in leaves]
    meta = Path("meta.mat")
    imagenet_mod._check_leaves(meta, ids, wnids)  # the real table passes
    with pytest.raises(BadInputError, match=r"ids listed twice: 6; ids missing: 7"):
        imagenet_mod._check_leaves(meta, [6 if i == 7 else i for i in ids], wnids)  # 999 distinct
    with pytest.raises(BadInputError, match=r"has 1001 leaf synsets .*ids beyond 1\.\.1000: "
                       r"1001"):
        imagenet_mod._check_leaves(meta, [*ids, 1001], [*wnids, "n99999999"])
    with pytest.raises(BadInputError, match=f"WNIDs listed twice: {SORTED[0]}"):
        imagenet_mod._check_leaves(meta, ids, [SORTED[0] if i == 9 else w for i, w in leaves])
    with pytest.raises(BadInputError, match=r"has 4 leaf synsets .*ids missing: 5, 6, 7"):
        imagenet_mod._check_leaves(meta, list(LEAVES), list(LEAVES.values()))


def test_the_ground_truth_names_the_line_and_the_value(tmp_path):
    devkit = make_devkit(tmp_path / "dk")
    gt = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth = [str(t) for t in TRUTH]
    truth[4] = "12.0"
    gt.write_text("\n".join(truth) + "\n\n")  # blank lines at the end are no line
    refused([make_val(tmp_path / "val"), tmp_path / "o", "--devkit", devkit],
            'ILSVRC2012_validation_ground_truth.txt: line 5: "12.0" is not a class id 1..1000')
    for value in ("0", "1001", "x", "", "-3", "+3", "٣"):  # the last: an Arabic-Indic 3
        truth[4] = value
        gt.write_text("\n".join(truth) + "\n")
        with pytest.raises(BadInputError, match=re.escape(f'line 5: "{value}" is not a class')):
            imagenet_mod._read_ground_truth(gt, 1000)
    gt.write_text("\n\n")
    with pytest.raises(BadInputError, match=r"ground_truth\.txt: empty"):
        imagenet_mod._read_ground_truth(gt, 1000)


def test_a_ground_truth_with_crlf_line_ends_is_read(tmp_path):
    devkit = make_devkit(tmp_path / "dk")
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_bytes(
        b"".join(b"%d\r\n" % t for t in TRUTH))
    res = cli("shard", make_val(tmp_path / "val"), tmp_path / "o", "--devkit", devkit)
    assert res.exit_code == 0, res.output
    assert labels_of(tmp_path / "o", "val") == val_reference()


def test_the_train_folder_alone_takes_its_names_from_the_devkit(tmp_path):
    train = make_train(tmp_path / "imagenet" / "train")
    devkit = make_devkit(tmp_path / "dk")
    res = cli("shard", train, tmp_path / "o", "--devkit", devkit)
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "o" / "shards.json").read_text())
    assert index["classes"] == SORTED and index["class_names"] == [WORDS[w] for w in SORTED]
    assert labels_of(tmp_path / "o", "train") == train_reference()
    (train / "n12345678").mkdir()  # a folder that is no synset of the devkit
    (train / "n12345678" / "a.JPEG").write_bytes((train / SORTED[0] / f"{SORTED[0]}_0.JPEG")
                                                 .read_bytes())
    refused([train, tmp_path / "o2", "--devkit", devkit],
            "1 of its 5 class folders are no synset of --devkit")


def test_an_imagenet_root_read_in_place_says_its_val_has_no_labels(tmp_path, caplog):
    root = tmp_path / "imagenet"
    make_train(root / "train")
    make_val(root / "val")
    caplog.set_level(logging.INFO, logger="cratemae.data")
    val = resolve_source(str(root), "val")
    assert val.classes is None
    said = [r.getMessage() for r in caplog.records if "k-NN" in r.getMessage()]
    assert len(said) == 1 and "image-net.org's flat val folder" in said[0], said
    assert "--devkit" in said[0]
    resolve_source(str(root), "val")  # once per folder, not once per resolution
    assert len([r for r in caplog.records if "k-NN" in r.getMessage()]) == 1


# --- 2. Kaggle's layout ----------------------------------------------------------------------


def test_an_image_listed_twice_with_two_synsets_names_both_lines(tmp_path):
    root = make_kaggle(tmp_path / "k")
    csv = root / "LOC_val_solution.csv"
    lines = csv.read_text().splitlines()
    image = lines[3].split(",")[0]
    other = next(w for w in SORTED if w not in lines[3])
    csv.write_text("\n".join([*lines, f"{image},{other} 1 2 3 4"]) + "\n")
    refused([root, tmp_path / "o"], f"{image} is listed twice with different synsets, on "
            f"line 4 ")
    assert f"and on line {len(lines) + 1} ({other})" in cli("shard", root, tmp_path / "o").output
    with pytest.raises(BadInputError, match="listed twice"):
        resolve_source(str(root), "val")


@pytest.mark.parametrize("missing", ["LOC_val_solution.csv", "LOC_synset_mapping.txt"])
def test_a_kaggle_root_lacking_a_file_is_refused_never_read_as_images(tmp_path, missing):
    root = make_kaggle(tmp_path / "k")
    (root / missing).unlink()
    refused([root, tmp_path / "o"], f"{root / missing}: not found, though")
    for split in ("train", "val"):
        with pytest.raises(BadInputError, match=f"{missing}: not found"):
            resolve_source(str(root), split)
    assert not (tmp_path / "o").exists()


def test_a_kaggle_csv_with_a_bom_and_crlf_is_read(tmp_path):
    root = make_kaggle(tmp_path / "k")
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        text = (root / name).read_text()
        (root / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    res = cli("shard", root, tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert labels_of(tmp_path / "o", "val") == val_reference()
    names = json.loads((tmp_path / "o" / "shards.json").read_text())["class_names"]
    assert names == [WORDS[w] for w in SORTED]  # no "\r", no BOM in the first name


def test_a_kaggle_csv_without_its_header_is_refused(tmp_path):
    root = make_kaggle(tmp_path / "k")
    csv = root / "LOC_val_solution.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[1:]) + "\n")
    refused([root, tmp_path / "o"], "LOC_val_solution.csv: not Kaggle's ImageId,"
            "PredictionString table (ValueError: its header is")


# --- 3. counts the data declares --------------------------------------------------------------

BAD_COUNTS = [12.5, "12", -1, True, None, 1e30, 2**60, [3]]


@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
def test_a_shards_json_count_that_is_no_whole_number_names_file_and_key(tmp_path, bad):
    d = tmp_path / "s"
    make_shards(d, [3, 4])
    index = json.loads((d / "shards.json").read_text())
    index["splits"]["train"][1]["samples"] = bad
    (d / "shards.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match=r"shards\.json: splits\.train\[1\]\.samples = .* "
                       r"is not a whole number of samples"):
        resolve_source(str(d), "train")


@pytest.mark.parametrize("bad", BAD_COUNTS, ids=repr)
def test_an_info_json_count_that_is_no_whole_number_names_file_and_key(tmp_path, bad):
    d = tmp_path / "wds"
    make_shards(d, [3, 4], prefix="train", index=False)
    info = {"splits": {"train": {"num_samples": 7, "shard_lengths": [3, bad],
                                 "filenames": ["train-000000.tar", "train-000001.tar"]}}}
    (d / "_info.json").write_text(json.dumps(info))
    with pytest.raises(BadInputError, match=r"_info\.json: splits\.train\.shard_lengths\[1\] "
                       r"= .* is not a whole number"):
        resolve_source(str(d), "train")
    info["splits"]["train"]["shard_lengths"] = [3, 4]
    info["splits"]["train"]["num_samples"] = bad
    (d / "_info.json").write_text(json.dumps(info))
    if bad is None:  # num_samples may be left out
        assert [s.count for s in resolve_source(str(d), "train").shards] == [3, 4]
        return
    with pytest.raises(BadInputError, match=r"splits\.train\.num_samples = "):
        resolve_source(str(d), "train")


def test_an_info_json_whose_counts_disagree_is_refused(tmp_path):
    d = tmp_path / "wds"
    make_shards(d, [3, 4], prefix="train", index=False)
    info = {"splits": {"train": {"num_samples": 8, "shard_lengths": [3, 4],
                                 "filenames": ["train-000000.tar", "train-000001.tar"]}}}
    (d / "_info.json").write_text(json.dumps(info))
    with pytest.raises(BadInputError, match=r"num_samples = 8, but its shard_lengths add up to 7"):
        resolve_source(str(d), "train")
    info["splits"]["train"].update(num_samples=7, shard_lengths=[7])
    (d / "_info.json").write_text(json.dumps(info))
    with pytest.raises(BadInputError, match=r"shard_lengths is not a list of one count per file"):
        resolve_source(str(d), "train")
    info["splits"]["train"].update(num_samples=6, shard_lengths=[3, 3],
                                   filenames=["train-000000.tar", "train-000000.tar"])
    (d / "_info.json").write_text(json.dumps(info))
    with pytest.raises(BadInputError, match=r"filenames lists 'train-000000.tar' twice"):
        resolve_source(str(d), "train")
    (d / "_info.json").write_text("[1, 2]")  # another program's file: ignored, counted
    assert [s.count for s in resolve_source(str(d), "train").shards] == [None, None]


@pytest.mark.parametrize("name", ["../train-000000.tar", "", "..", 7, None])
def test_a_shards_json_naming_no_file_beside_it_is_refused(tmp_path, name):
    d = tmp_path / "s"
    make_shards(d, [3])
    index = json.loads((d / "shards.json").read_text())
    index["splits"]["train"][0]["name"] = name
    (d / "shards.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match=r"splits\.train\[0\]\.name = .* is not the name of "
                       r"a file beside it"):
        resolve_source(str(d), "train")


def test_a_shards_json_listing_a_tar_twice_or_leaving_one_out_is_refused(tmp_path):
    """A tar listed twice was read twice (17 rows from 12 images, exit 0); a tar beside the
    index that it does not list was left out. Both contradict the folder: refused."""
    d = tmp_path / "s"
    make_shards(d, [3, 4, 5])
    good = json.loads((d / "shards.json").read_text())
    index = json.loads(json.dumps(good))
    index["splits"]["train"].append(index["splits"]["train"][0])
    (d / "shards.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match=r"splits\.train\[3\]\.name = 'train-000000.tar' "
                       r"is listed twice \(also splits\.train\[0\]\)"):
        resolve_source(str(d), "train")
    index = json.loads(json.dumps(good))
    del index["splits"]["train"][1]
    (d / "shards.json").write_text(json.dumps(index))
    with pytest.raises(BadInputError, match=r"train-000001.tar: a tar that .*shards.json does "
                       r"not list \(1 such\)"):
        resolve_source(str(d), "train")
    (d / "shards.json").write_text(json.dumps(good))
    (d / ".train-000009.tar").write_bytes(b"")  # hidden (a writer's temporary): not data
    assert [s.count for s in resolve_source(str(d), "train").shards] == [3, 4, 5]


def test_one_tar_reached_twice_is_refused(tmp_path):
    """A shard that is a link to another (its counts agree, so shards.json holds), or a list
    naming one tar twice, read its samples twice (12 rows, 7 distinct keys, exit 0)."""
    d = tmp_path / "s"
    make_shards(d, [3, 3])
    (d / "train-000001.tar").unlink()
    (d / "train-000001.tar").symlink_to(d / "train-000000.tar")
    with pytest.raises(BadInputError, match=r"^data.train: .*train-000001.tar and .*"
                       r"train-000000.tar are one file; its samples would be read twice$"):
        resolve_source(str(d), "train")
    one = str(tmp_path / "s" / "train-000000.tar")
    with pytest.raises(BadInputError, match=r"are one file"):
        resolve_source([one, one], "train")
    with pytest.raises(BadInputError, match=r"are one file"):
        resolve_source([one, str(tmp_path / "s" / "." / "train-000000.tar")], "train")
    (d / "train-000001.tar").unlink()
    make_shards(tmp_path / "t", [3, 3])
    assert len(resolve_source(str(tmp_path / "t"), "train").shards) == 2


def test_a_fifo_named_as_a_shard_is_refused_not_skipped(tmp_path):
    """A `.tar` in a data folder that is a FIFO would make the epoch a shard short if it
    were skipped, and would block forever if it were opened: it is refused by name."""
    from data_fixtures import write_tar

    from cratemae.data.sources import resolve_source

    write_tar(tmp_path / "train-000000.tar", [("a.jpg", b"x"), ("a.cls", b"0")])
    os.mkfifo(tmp_path / "train-000001.tar")
    with pytest.raises(BadInputError, match=r"train-000001\.tar: is a FIFO"):
        resolve_source(str(tmp_path), "train")
