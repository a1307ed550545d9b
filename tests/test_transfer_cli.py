"""`cratemae shard` of the download formats, through the command: it says the layout it
recognised and each split's samples and classes; hostile input is one `error:` line, exit 2,
nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import cli
from test_transfer_cifar import cifar10_batches, write_cifar10_binary, write_cifar100_binary
from test_transfer_oxford import write_pets


def test_shard_says_the_layout_and_each_splits_samples_and_classes(tmp_path: Path) -> None:
    write_cifar100_binary(tmp_path / "dl")
    res = cli("shard", tmp_path / "dl", tmp_path / "out", "--cifar100-labels", "coarse")
    assert res.exit_code == 0, res.output
    assert "layout: CIFAR-100, binary version, coarse labels" in res.output
    assert "train: 6 samples in 1 shards, 5 classes" in res.output
    assert "test: 3 samples in 1 shards, 3 classes" in res.output
    assert "20 classes: coarse0, coarse1" in res.output


def _bad_label(root: Path) -> None:
    batches = cifar10_batches()
    batches["data_batch_1"][1][0] = 200
    write_cifar10_binary(root, batches)


def _bad_class_id(root: Path) -> None:
    write_pets(root, test=[("Abyssinian_9", 0)])


@pytest.mark.parametrize(("make", "args", "match"), [
    (_bad_label, [], "data_batch_1.bin: record 0 has label 200, outside 0..9"),
    (_bad_class_id, [], 'test.txt: line 1: "Abyssinian_9 0 2 0" is not "NAME CLASS_ID'),
    (write_cifar10_binary, ["--cifar100-labels", "coarse"], "CIFAR-10, binary version has "
     "one label set; drop the option"),
    (write_pets, ["--cifar100-labels", "fine"], "--cifar100-labels applies to CIFAR-100"),
    (write_pets, ["--image-column", "img"], "--image-column and --label-column apply to "
     "Parquet files"),
], ids=["label-byte", "class-id", "cifar10-coarse", "pets-cifar100", "columns"])
def test_hostile_input_is_one_error_line_and_nothing_written(tmp_path: Path, make, args,
                                                            match: str) -> None:
    make(tmp_path / "dl")
    res = cli("shard", tmp_path / "dl", tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output, res.output
    assert match in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out").exists()
