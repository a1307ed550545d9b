"""Data in the layouts people have: a folder of train and val shards, a folder whose
sub-folders are the splits, globs, pipes and URLs, and messages that say what was found."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import data_section, image_tree, labelled_shards, make_shards

from cratemae.data import build_loader
from cratemae.errors import BadInputError


def loader(data, split: str = "train"):
    return build_loader(data, split=split, augment="none", img_size=8, seed=0, epoch=0)


def test_a_folder_of_train_and_val_shards_is_read_by_split(tmp_path: Path) -> None:
    d = tmp_path / "in1k"
    make_shards(d, [5, 6], prefix="train", index=False)
    make_shards(d, [3], prefix="val", index=False)
    data = data_section(str(d), val=str(d))
    assert loader(data, "train").num_samples == 11  # not 14: no validation image in training
    assert loader(data, "val").num_samples == 3
    (d / "val-000000.tar").rename(d / "test-000000.tar")  # no split of the name asked for
    with pytest.raises(BadInputError, match=r"several splits \(test, train\), none named "
                       r"val-\*: give a brace pattern of the ones to read, e\.g\. "):
        loader(data, "val")


def test_a_folder_whose_sub_folders_are_splits_is_read_by_split(tmp_path: Path) -> None:
    image_tree(tmp_path / "pets" / "train", ["cat", "dog"], per_class=3)
    image_tree(tmp_path / "pets" / "val", ["cat", "dog"], per_class=1)
    data = data_section(str(tmp_path / "pets"), val=str(tmp_path / "pets"), batch_size=2)
    train = loader(data, "train")
    assert train.classes == ("cat", "dog") and train.num_samples == 6  # not classes train/val
    assert loader(data, "val").num_samples == 2


def test_a_glob_works_and_a_url_glob_says_to_use_braces(tmp_path: Path) -> None:
    d = tmp_path / "s"
    make_shards(d, [5, 6], prefix="train", index=False)
    make_shards(d, [3], prefix="val", index=False)
    assert loader(data_section(str(d / "train-*.tar"))).num_samples == 11
    with pytest.raises(BadInputError, match=r"no file matches .*nope-\*\.tar"):
        loader(data_section(str(d / "nope-*.tar")))
    with pytest.raises(BadInputError, match=r"a URL cannot be globbed; give a brace pattern"):
        loader(data_section("https://example.com/train-*.tar"))


def test_pipe_validation_data_is_counted_by_one_pass(tmp_path: Path) -> None:
    labelled_shards(tmp_path, "val", [5, 7])
    data = data_section("demo:train", val=f"pipe:cat {tmp_path}/val-{{000000..000001}}.tar")
    first = loader(data, "val")
    assert first.num_samples == 12 and sum(len(b) for b in first) == 12
    (tmp_path / "val-000000.tar").unlink()  # the counts come from the cache now
    assert loader(data, "val").num_samples == 12


def test_an_unreachable_url_is_reported_as_unreachable_with_the_url() -> None:
    data = data_section("demo:train", val="http://127.0.0.1:9/val-{000000..000001}.tar")
    with pytest.raises(BadInputError,
                       match=r"^http://127\.0\.0\.1:9/val-000000\.tar: unreachable"):
        loader(data, "val")


def test_no_samples_in_a_row_never_names_more_shards_than_exist() -> None:
    data = data_section("pipe:true", epoch_samples=8)  # a command that sends nothing
    with pytest.raises(BadInputError) as err:
        list(build_loader(data, split="train", augment="crop", img_size=8, seed=0, epoch=0))
    message = str(err.value)
    assert message.startswith("no samples could be read from the only shard of this reader")
    assert "pipe:true: unreachable" in message
