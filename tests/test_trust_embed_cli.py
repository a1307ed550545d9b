"""`cratemae embed` never destroys what it reads, never runs twice into one --out, never
writes a non-finite row marked valid, resumes past a damaged chunk, and speaks the probe's
words (pool `token|avg`, layers from 0) so that `probe --features` takes what it wrote."""

# ruff: noqa: F811 - the tests take test_embed's fixtures (ckpt, folder) as arguments

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from support import PROBE_DEMO_RECIPE, cli
from test_embed import N_IMAGES, _embed, ckpt, folder  # noqa: F401 - fixtures, reused

import cratemae.eval.embed as embed_mod
from cratemae.commands.embed import default_workers
from cratemae.errors import CrateMAEError
from cratemae.eval.embed import parts_dir
from cratemae.eval.embed_chunks import (
    PartsLock,
    chunk_arrays,
    chunk_name,
    complete_prefix,
    write_chunk,
)
from cratemae.eval.embeddings import read_embeddings, read_probe_pair
from cratemae.recipe import load_recipe


def _refused(run, *words: str) -> str:
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _base(folder: Path, ckpt: Path, out: Path) -> list[object]:
    return ["embed", folder, "--checkpoint", ckpt, "--out", out, "--workers", "0"]


# --- outputs never destroy inputs ---------------------------------------------------------
def test_out_onto_the_checkpoint_or_the_data_is_refused_even_with_overwrite(
        ckpt, folder, tmp_path) -> None:
    before = ckpt.read_bytes()
    _refused(cli(*_base(folder, ckpt, ckpt), "--overwrite"), "is the input")
    assert ckpt.read_bytes() == before
    image = sorted(folder.glob("cat/*.png"))[0]
    _refused(cli(*_base(folder, ckpt, image), "--overwrite"), "inside", str(folder))
    listed = tmp_path / "list.txt"
    listed.write_text(f"{image}\n")
    _refused(cli(*_base(f"@{listed}", ckpt, listed), "--overwrite"), "is the input")
    _refused(cli(*_base(folder, ckpt, folder), "--overwrite", "--format", "npy"), "is the input")


def test_out_on_an_image_of_a_list_is_refused(ckpt, folder, tmp_path) -> None:
    """An image read through @LIST, not through a folder named on the command line."""
    image = tmp_path / "copy.png"
    image.write_bytes(sorted(folder.glob("cat/*.png"))[0].read_bytes())
    listed = tmp_path / "list.txt"
    listed.write_text(f"{image}\n")
    before = image.read_bytes()
    _refused(cli(*_base(f"@{listed}", ckpt, image), "--overwrite"), "is the input")
    assert image.read_bytes() == before


def test_out_in_a_run_or_its_checkpoints_is_refused(ckpt, folder, tmp_path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000000001").mkdir(parents=True)
    (run / "recipe.toml").write_text("")
    weights = run / "checkpoints" / "step-000000001" / "model.safetensors"
    weights.write_bytes(ckpt.read_bytes())
    out = run / "checkpoints" / "f.safetensors"
    _refused(cli(*_base(folder, weights, out)), "inside")
    _refused(cli(*_base(folder, ckpt, out)), "checkpoints of the run")
    assert not out.exists() and not parts_dir(out).exists()
    beside = run / "f.safetensors"  # in the run of the checkpoint read
    _refused(cli(*_base(folder, weights, beside)), "inside", str(run))
    assert not beside.exists()


@pytest.mark.parametrize("special", ["fifo", "/dev/full"])
def test_out_onto_a_special_file_is_refused(ckpt, folder, tmp_path, special) -> None:
    out = Path(special) if special.startswith("/") else tmp_path / special
    if special == "fifo":
        os.mkfifo(out)
    elif not out.exists():
        pytest.skip(f"{special} is not on this system")
    for flags in ([], ["--overwrite"]):
        _refused(cli(*_base(folder, ckpt, out), *flags), "not a file")


def test_a_parts_folder_that_is_a_file_is_refused(ckpt, folder, tmp_path) -> None:
    out = tmp_path / "f.safetensors"
    parts_dir(out).write_text("mine")
    _refused(cli(*_base(folder, ckpt, out)), ".parts", "is a file")
    assert parts_dir(out).read_text() == "mine"


# --- one embed into one --out at a time -----------------------------------------------------
def test_a_second_embed_into_the_same_out_is_refused_at_start(ckpt, folder, tmp_path) -> None:
    out = tmp_path / "f.safetensors"
    with PartsLock(out):  # the first embed, still running
        msg = _refused(cli(*_base(folder, ckpt, out)), "another embed is writing it")
        assert f"pid {os.getpid()}" in msg
        assert not parts_dir(out).exists() and not out.exists()
    assert not PartsLock(out).lock.path.exists()  # the first leaves nothing behind


def test_the_lock_is_taken_once_and_released(tmp_path) -> None:
    out = tmp_path / "f.safetensors"
    got: list[str] = []

    def second() -> None:
        try:
            with PartsLock(out):
                got.append("locked")
        except Exception as err:
            got.append(type(err).__name__)

    with PartsLock(out):
        t = threading.Thread(target=second)
        t.start()
        t.join()
    assert got == ["BadInputError"]
    with PartsLock(out):  # free again
        pass
    assert list(tmp_path.iterdir()) == []
    with PartsLock(tmp_path / "new" / "f.safetensors"):  # --out in a folder still to make
        pass
    assert list((tmp_path / "new").iterdir()) == []


# --- damaged chunks -----------------------------------------------------------------------
def _chunk(path: Path, n: int = 4, d: int = 8, tag: str = "mine") -> None:
    write_chunk(path, [{"features": torch.zeros(n, d),
                        "labels": torch.zeros(n, dtype=torch.int64),
                        "valid": torch.ones(n, dtype=torch.bool),
                        "keys": [str(i) for i in range(n)], "positions": torch.arange(n)}], tag)


@pytest.mark.parametrize("damage", ["truncated", "header", "rows", "array", "foreign"])
def test_a_damaged_chunk_is_found_and_removed_to_be_computed_again(tmp_path, damage) -> None:
    names = chunk_arrays(())
    for k in range(3):
        _chunk(tmp_path / chunk_name(k))
    bad = tmp_path / chunk_name(1)
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-10])
    elif damage == "header":
        bad.write_bytes(b"\xff" * 8 + bad.read_bytes()[8:])
    elif damage == "rows":
        _chunk(bad, n=3)
    elif damage == "foreign":  # a whole chunk of another embed, copied in by hand
        _chunk(bad, tag="another embed's")
    else:
        write_chunk(bad, [{"features": torch.zeros(4, 8), "positions": torch.arange(4),
                           "keys": list("abcd")}], "mine")
    assert complete_prefix(tmp_path, 3, names, "mine", lambda k: 4) == 1 and bad.exists()
    assert complete_prefix(tmp_path, 3, names, "mine", lambda k: 4, remove=True) == 1
    assert not bad.exists()


@pytest.mark.slow  # three embeds, ~7 s on two busy cores; quick twin: the test above
def test_an_embed_resumes_past_a_truncated_chunk(ckpt, folder, tmp_path, monkeypatch) -> None:
    out = tmp_path / "f.safetensors"
    real, count = embed_mod.write_chunk, []

    def dies_on_the_third(path: Path, rows: list, tag: str) -> None:
        if len(count) == 2:
            raise KeyboardInterrupt
        count.append(path)
        real(path, rows, tag)

    monkeypatch.setattr(embed_mod, "write_chunk", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _embed(ckpt, [str(folder)], out, chunk_size=4)
    first = count[0]
    first.write_bytes(first.read_bytes()[:100])  # a copy cut short
    monkeypatch.setattr(embed_mod, "write_chunk", real)
    result = _embed(ckpt, [str(folder)], out, chunk_size=4)
    assert result.resumed_chunks == 0 and result.num_samples == N_IMAGES
    whole = _embed(ckpt, [str(folder)], tmp_path / "whole.safetensors", chunk_size=4)
    assert whole.out.read_bytes() == out.read_bytes() and not parts_dir(out).exists()


# --- never a non-finite row marked valid ----------------------------------------------------
def test_a_non_finite_feature_stops_embed_naming_the_sample(ckpt, folder, tmp_path,
                                                            monkeypatch) -> None:
    real = embed_mod.encode_batch

    def overflows(*args, **kw):
        out = {k: v.clone() for k, v in real(*args, **kw).items()}
        out["features"][1, 0] = float("inf")
        return out

    monkeypatch.setattr(embed_mod, "encode_batch", overflows)
    out = tmp_path / "f.safetensors"
    with pytest.raises(CrateMAEError, match=r"sample '.*cat/00[0-9].png' gave non-finite "
                       r"features .* precision fp32") as err:
        _embed(ckpt, [str(folder)], out)
    assert err.value.exit_code == 1 and not out.exists()


def test_labels_past_the_class_list_are_refused_and_nothing_written(ckpt, tmp_path) -> None:
    """A shards.json naming 2 classes over shards labelled 0..3: embed wrote a file whose
    labels named no class (exit 0). One `error:` line, exit 2, no --out; the class list
    long enough passes."""
    import json

    from data_fixtures import make_shards

    make_shards(tmp_path / "d", [2, 2], prefix="val")  # labels 0, 1, 2, 3
    index = json.loads((tmp_path / "d" / "shards.json").read_text())
    (tmp_path / "d" / "shards.json").write_text(json.dumps({**index, "classes": ["a", "b"]}))
    out = tmp_path / "f.safetensors"
    run = cli(*_base(tmp_path / "d", ckpt, out))
    errors = [x for x in run.stderr.splitlines() if x.startswith("error: ")]
    assert run.exit_code == 2 and errors == [run.stderr.strip().splitlines()[-1]], run.stderr
    assert errors[0] == (f"error: {tmp_path / 'd'}: a sample has label 3, but its class list "
                         "names 2 classes (labels 0..1): the labels and the class list disagree")
    assert not out.exists()
    index["classes"] = ["a", "b", "c", "d"]
    (tmp_path / "d" / "shards.json").write_text(json.dumps(index))
    run = cli(*_base(tmp_path / "d", ckpt, out))
    assert run.exit_code == 0, run.output
    assert read_embeddings(out)[1].tolist() == [0, 1, 2, 3]


def test_repeated_sample_keys_are_said(ckpt, tmp_path, caplog) -> None:
    """A shard copied over another (the counts agree) made a file of 4 rows and 2 distinct
    keys with no word: embed cannot tell a copy from shards that number their keys alike,
    so it says so, with the first repeated key; distinct keys say nothing."""
    import logging
    import shutil

    from data_fixtures import make_shards

    make_shards(tmp_path / "d", [2, 2], prefix="val")
    caplog.set_level(logging.WARNING, logger="cratemae")
    run = cli(*_base(tmp_path / "d", ckpt, tmp_path / "a.safetensors"))
    assert run.exit_code == 0 and "sample keys repeat" not in caplog.text, run.output
    shutil.copyfile(tmp_path / "d" / "val-000000.tar", tmp_path / "d" / "val-000001.tar")
    run = cli(*_base(tmp_path / "d", ckpt, tmp_path / "b.safetensors"))
    assert run.exit_code == 0, run.output
    assert ("2 of the 4 sample keys repeat an earlier one (first 's0_0'): the data holds those "
            "samples more than once") in caplog.text


# --- the probe's words --------------------------------------------------------------------
def test_pool_cls_is_token_and_the_probe_reads_it(ckpt, folder, tmp_path) -> None:
    """`--pool cls` (deprecated, one warning line) and `--pool token` write the pooling that
    the default probe recipe (`probe.pool = "token"`, `probe.layer = -1`) accepts."""
    files = [tmp_path / "train.safetensors", tmp_path / "val.safetensors"]
    for file, word, split in zip(files, ("cls", "token"), ("train", "val"), strict=True):
        run = cli(*_base(folder, ckpt, file), "--pool", word, "--split", split)
        assert run.exit_code == 0, run.output
        warned = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
        assert warned == (["warning: --pool cls is deprecated: use --pool token (the word "
                           "probe.pool uses)"] if word == "cls" else [])
        assert read_embeddings(file)[3]["pool"] == "token"
        assert "(token of the last layer, with labels)" in run.stdout
    probe = load_recipe(PROBE_DEMO_RECIPE).probe
    train, val, meta = read_probe_pair(*files, pool=probe.pool, layer=probe.layer)
    assert train.features.shape == val.features.shape == (N_IMAGES, 32)
    assert (meta["layer"], meta["layers"]) == (2, [])
    _refused(cli(*_base(folder, ckpt, tmp_path / "x"), "--pool", "max"), "token", "avg")


def test_help_speaks_of_token_avg_and_layers_from_0() -> None:
    run = cli("embed", "--help")
    text = " ".join(run.stdout.split())
    assert "token|avg" in text and "0 is the first, -1 the last" in text
    assert "most 8; 0 on one CPU" in text


@pytest.mark.parametrize(("cpus", "local", "want"), [(1, None, 0), (2, None, 2), (4, None, 4),
                                                     (64, None, 8), (16, "8", 2), (8, "8", 0)])
def test_workers_follow_the_cpus(monkeypatch, cpus, local, want) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert default_workers() == want
