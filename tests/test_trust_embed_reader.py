"""The embeddings reader and the probe's pair of files: hostile or mismatched files are one
`BadInputError` naming the file (and the array), never a traceback or a score of nothing.

The files are made by hand here (milliseconds): the layout of `cratemae.eval.embeddings`,
written by `safetensors` or as an npy directory, with the metadata `cratemae embed` gives.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cratemae.errors import BadInputError
from cratemae.eval.embeddings import (
    FORMAT,
    encode_keys,
    read_embeddings,
    read_probe_pair,
    read_probe_split,
)

N, D = 6, 4
CLASSES = ["cat", "dog"]


def _meta(**over: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "format": FORMAT, "pool": "token", "layer": 2, "layers": [0], "img_size": 32,
        "mean": [0.5] * 3, "std": [0.25] * 3, "architecture": "crate_mae_tiny",
        "checkpoint_sha256": "a" * 64, "model": {"depth": 3, "embed_dim": D},
        "classes": CLASSES, "num_samples": N, "dim": D}
    return {**meta, **over}


def _arrays(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(N, D, generator=g), "layers.0": torch.randn(N, D, generator=g),
            "labels": torch.arange(N) % 2, "valid": torch.ones(N, dtype=torch.bool)}


def _keys(prefix: str) -> list[str]:
    return [f"{prefix}/{i}.png" for i in range(N)]


def write_st(path: Path, arrays: dict | None = None, keys: list[str] | None = None,
             meta: dict | None = None, **over: object) -> Path:
    """An embeddings file as `cratemae embed` writes it, with `over` in its metadata."""
    arrays = _arrays() if arrays is None else arrays
    data, offsets = encode_keys(_keys(path.stem) if keys is None else keys)
    tensors = {**arrays, "keys": torch.from_numpy(data.copy()),
               "key_offsets": torch.from_numpy(offsets)}
    meta = _meta(**over) if meta is None else meta
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=strings)
    return path


def write_npy(path: Path, arrays: dict | None = None, **over: object) -> Path:
    arrays = _arrays() if arrays is None else arrays
    path.mkdir()
    for name, t in arrays.items():
        np.save(path / f"{name}.npy", t.numpy())
    (path / "keys.jsonl").write_text("".join(json.dumps(k) + "\n" for k in _keys(path.stem)))
    index = {**_meta(**over), "arrays": {n: f"{n}.npy" for n in arrays}, "keys": "keys.jsonl"}
    (path / "index.json").write_text(json.dumps(index))
    return path


def pair(train: Path, val: Path, **kw: object):
    return read_probe_pair(train, val, **{"pool": "token", "layer": -1, **kw})  # type: ignore


def refused(match: str, train: Path, val: Path, **kw: object) -> str:
    with pytest.raises(BadInputError, match=match) as err:
        pair(train, val, **kw)
    assert "\n" not in str(err.value)
    return str(err.value)


# --- the pair -----------------------------------------------------------------------------
def test_a_matching_pair_reads_as_two_feature_sets(tmp_path) -> None:
    train, val = write_st(tmp_path / "train.st"), write_st(tmp_path / "val.st")
    a, b, meta = pair(train, val)
    assert a.features.shape == b.features.shape == (N, D) and a.from_cache
    assert torch.equal(a.labels, torch.arange(N) % 2) and meta["classes"] == CLASSES
    torch.testing.assert_close(pair(train, val, layer=0)[0].features, _arrays()["layers.0"])


def test_class_names_that_differ_are_refused(tmp_path) -> None:
    """ImageNet synsets in val against the demo's classes in train: label 0 means two
    classes (today: exit 0, top-1 0.0)."""
    train = write_st(tmp_path / "train.st")
    val = write_st(tmp_path / "val.st", classes=["n01440764", "n01443537"])
    msg = refused("name their classes differently", train, val)
    assert "label 0 is 'cat'" in msg and "'n01440764'" in msg
    fewer = write_st(tmp_path / "fewer.st", classes=["cat", "dog", "cow"])
    refused("2 classes in .*3 in", train, fewer)


def test_only_one_file_naming_its_classes_is_a_warning(tmp_path, caplog) -> None:
    train, val = write_st(tmp_path / "train.st"), write_st(tmp_path / "val.st", classes=None)
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        pair(train, val)
    assert "numbered labels only" in caplog.text


def test_the_same_file_twice_is_refused(tmp_path) -> None:
    train = write_st(tmp_path / "train.st")
    refused("both TRAIN and VAL", train, train)
    os.symlink(train, tmp_path / "link.st")
    refused("both TRAIN and VAL", train, tmp_path / "link.st")


def test_some_samples_in_both_files_are_a_warning(tmp_path, caplog) -> None:
    train = write_st(tmp_path / "train.st", keys=_keys("x"))
    val = write_st(tmp_path / "val.st", keys=_keys("x")[:3] + _keys("y")[3:])
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        pair(train, val)
    assert f"3 of the {N} val samples" in caplog.text


def test_a_copy_of_the_train_file_as_val_is_refused(tmp_path, caplog) -> None:
    """A copy is not the same file, but the same samples: refused, however the data's path
    was spelled, and when a file records no split. Files of two recorded splits that share
    every key (splits that number their samples alike) stay a warning."""
    train = write_st(tmp_path / "train.st", keys=_keys("x"), data=["demo:train"], split="train")
    (tmp_path / "copy.st").write_bytes(train.read_bytes())
    msg = refused("every sample of .*copy.st is one of", train, tmp_path / "copy.st")
    assert "(both of the train split)" in msg
    spelled = write_st(tmp_path / "spelled.st", keys=_keys("x"), data=["./x/"], split="train")
    refused("both of the train split", train, spelled)
    unsaid = write_st(tmp_path / "unsaid.st", keys=_keys("x"), data=["demo:train"])
    refused("a split not recorded", train, unsaid)
    val = write_st(tmp_path / "val.st", keys=_keys("x"), data=["demo:val"], split="val")
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        pair(train, val)
    assert f"{N} of the {N} val samples" in caplog.text


def test_files_given_the_other_way_round_are_refused_or_warned(tmp_path, caplog) -> None:
    train = write_st(tmp_path / "train.st", split="train")
    val = write_st(tmp_path / "val.st", split="val")
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        pair(train, val)
    assert "TRAIN VAL" not in caplog.text
    msg = refused("embedded from the val split", val, train)
    assert msg.endswith("give them as --features TRAIN VAL")
    caplog.clear()
    few = {k: v[:3] for k, v in _arrays().items()}
    small = write_st(tmp_path / "small.st", arrays=few, keys=_keys("s")[:3], num_samples=3)
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        pair(small, val)
    assert f"fewer samples (3) than the VAL file {val} ({N})" in caplog.text


@pytest.mark.parametrize(("key", "value"), [
    ("checkpoint_sha256", "b" * 64), ("img_size", 64), ("mean", [0.4] * 3),
    ("architecture", "vit_tiny_patch16_224")])
def test_files_of_other_weights_or_preprocessing_are_refused(tmp_path, key, value) -> None:
    train, val = write_st(tmp_path / "train.st"), write_st(tmp_path / "val.st", **{key: value})
    refused(f"differ in {key}", train, val)


def test_a_file_without_a_checkpoint_digest_is_refused(tmp_path) -> None:
    meta = {k: v for k, v in _meta().items() if k != "checkpoint_sha256"}
    train, val = write_st(tmp_path / "train.st", meta=meta), write_st(tmp_path / "val.st")
    refused("records no checkpoint_sha256", train, val)


def test_other_widths_pooling_and_layers_are_refused(tmp_path) -> None:
    train = write_st(tmp_path / "train.st")
    wide = {k: torch.cat([v, v], 1) if v.dim() == 2 else v for k, v in _arrays().items()}
    val = write_st(tmp_path / "wide.st", wide, dim=2 * D)
    refused(f"{D}-dimensional features, .* {2 * D}-dimensional", train, val)
    refused("pooled by 'token', but probe.pool = 'avg'", train, val, pool="avg")
    refused("holds no features of layer 1 ", train, val, layer=1)
    deeper = write_st(tmp_path / "deeper.st", layer=3)  # the same weights cannot differ
    refused(r"differ in layer \(2 vs 3\)", train, deeper)


def test_old_pool_words_in_a_file_read_as_timms(tmp_path) -> None:
    train, val = write_st(tmp_path / "t.st", pool="cls"), write_st(tmp_path / "v.st", pool="cls")
    assert pair(train, val)[2]["pool"] == "token"


def test_npy_and_safetensors_pair_up(tmp_path) -> None:
    a = pair(write_st(tmp_path / "train.st"), write_npy(tmp_path / "val"))
    torch.testing.assert_close(a[1].features, _arrays()["features"])


# --- one file, hostile --------------------------------------------------------------------
def _bad(arrays_over: dict | None = None, **meta_over: object):
    return {**_arrays(), **(arrays_over or {})}, meta_over


@pytest.mark.parametrize(("arrays", "meta", "match"), [
    ({"features": _arrays()["features"].T.contiguous()}, {},
     r"array 'features' has shape \(4, 6\), expected \(6, d\)"),
    ({"features": torch.randn(N)}, {}, r"array 'features' has shape \(6,\)"),
    ({"labels": torch.zeros(N - 1, dtype=torch.int64)}, {}, r"array 'labels' has shape \(5,\)"),
    ({"labels": torch.zeros(N, 1, dtype=torch.int64)}, {}, r"array 'labels' has shape \(6, 1\)"),
    ({"labels": torch.zeros(N)}, {}, "array 'labels' has dtype float32, expected integer"),
    ({"features": torch.zeros(N, D, dtype=torch.int64)}, {}, "has dtype int64, expected float"),
    ({"valid": torch.ones(N)}, {}, "array 'valid' has dtype float32, expected bool"),
    ({}, {"num_samples": N + 1}, "metadata says num_samples = 7, but its arrays hold 6"),
    ({}, {"dim": D * 2}, "metadata says dim = 8, but its arrays hold 4"),
    ({"labels": torch.tensor([0, 1, -1, 0, 1, 0])}, {}, "must all carry class labels"),
    ({"labels": torch.tensor([0, 1, 2, 0, 1, 0])}, {}, "holds label 2, but the file names 2"),
])
def test_a_file_that_contradicts_itself_is_one_error(tmp_path, arrays, meta, match) -> None:
    bad = write_st(tmp_path / "bad.st", {**_arrays(), **arrays}, **meta)
    with pytest.raises(BadInputError, match=match) as err:
        read_probe_split(bad, pool="token", layer=-1, split="train")
    assert str(err.value).startswith(str(bad)) and "\n" not in str(err.value)
    refused(match, write_st(tmp_path / "good.st"), bad)


def test_non_finite_features_are_refused_unless_the_row_is_invalid(tmp_path) -> None:
    arrays = _arrays()
    arrays["features"][3, 1] = float("nan")
    bad = write_st(tmp_path / "nan.st", arrays)
    with pytest.raises(BadInputError, match=r"non-finite values in 1 row.*'nan/3.png'"):
        read_embeddings(bad)
    refused("non-finite", write_st(tmp_path / "good.st"), bad)
    arrays["valid"][3] = False  # an image that could not be read: its row is left out
    feats = read_embeddings(write_st(tmp_path / "invalid.st", arrays))[0]
    assert feats.shape == (N - 1, D)
    arrays["layers.0"][0, 0] = float("inf")
    with pytest.raises(BadInputError, match=r"'layers\.0' holds non-finite"):
        read_embeddings(write_st(tmp_path / "inf.st", arrays), layer=0)


def test_keys_that_do_not_match_the_rows_are_refused(tmp_path) -> None:
    short = write_st(tmp_path / "short.st", keys=_keys("s")[:-1])
    with pytest.raises(BadInputError, match=r"'features' has shape \(6, 4\), expected \(5, d\)"):
        read_embeddings(short)
    data, offsets = encode_keys(_keys("k"))
    offsets[2], offsets[3] = offsets[3], offsets[2]  # not in order
    tensors = {**_arrays(), "keys": torch.from_numpy(data.copy()),
               "key_offsets": torch.from_numpy(offsets)}
    save_file(tensors, str(tmp_path / "order.st"), metadata={"format": FORMAT})
    with pytest.raises(BadInputError, match=r"key_offsets .* do not cut"):
        read_embeddings(tmp_path / "order.st")


def test_files_that_are_not_embeddings_are_one_error(tmp_path) -> None:
    save_file({"features": torch.zeros(2, 2)}, str(tmp_path / "plain.st"))  # no metadata
    with pytest.raises(BadInputError, match="not an embeddings file of cratemae embed"):
        read_embeddings(tmp_path / "plain.st")
    (tmp_path / "text.st").write_text("hello")
    with pytest.raises(BadInputError, match="unreadable embeddings file"):
        read_embeddings(tmp_path / "text.st")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(BadInputError, match="is a FIFO"):
        read_embeddings(tmp_path / "fifo")


def test_an_npy_index_names_only_regular_files_inside_its_directory(tmp_path) -> None:
    d = write_npy(tmp_path / "npy")
    np.save(tmp_path / "outside.npy", np.zeros((N, D), dtype=np.float32))
    os.mkfifo(d / "pipe.npy")
    for name, match in (("../outside.npy", "not a file name"), ("pipe.npy", "is a FIFO")):
        index = json.loads((d / "index.json").read_text())
        index["arrays"]["features"] = name
        (d / "index.json").write_text(json.dumps(index))
        with pytest.raises(BadInputError, match=match):
            read_embeddings(d)
    index["arrays"]["features"] = "features.npy"
    (d / "index.json").write_text(json.dumps(index))
    np.save(d / "labels.npy", np.array([object()] * N))  # a pickle: never loaded
    with pytest.raises(BadInputError, match="array 'labels' is unreadable"):
        read_embeddings(d)


# --- layers -------------------------------------------------------------------------------
def test_layers_are_numbered_from_0_and_negative_from_the_end(tmp_path) -> None:
    path = write_st(tmp_path / "f.st")
    arrays = _arrays()
    for layer, want in ((0, "layers.0"), (-3, "layers.0"), (2, "features"), (-1, "features"),
                        (None, "features")):
        torch.testing.assert_close(read_embeddings(path, layer)[0], arrays[want])
    for layer in (1, -2, 3, -4):
        with pytest.raises(BadInputError, match=f"holds no features of layer {layer} "):
            read_embeddings(path, layer)
    meta = {k: v for k, v in _meta().items() if k != "model"}  # depth from `layer` alone
    old = write_st(tmp_path / "old.st", meta=meta)
    torch.testing.assert_close(read_embeddings(old, -1)[0], arrays["features"])
    torch.testing.assert_close(read_embeddings(old, -3)[0], arrays["layers.0"])
