"""A new user's first hour (issue 19): data in the layouts people have, messages that lead
somewhere, and no silent surprises. The reconstruct and analyze defaults are tested in
test_reconstruct.py and test_analyze.py, the help texts in test_cli.py."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest
from data_fixtures import data_section, encode, make_shards, solid, write_tar
from typer.testing import CliRunner

from cratemae.commands.app import build_app
from cratemae.data import build_loader
from cratemae.errors import BadInputError
from cratemae.eval.labels import resolve_num_classes
from cratemae.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.toml"
PROBE_DEMO = REPO / "recipes" / "probe" / "demo.toml"
ENV = {"COLUMNS": "200", "NO_COLOR": "1"}
TINY = ["model.embed_dim=32", "model.decoder_embed_dim=32", "model.depth=1",
        "model.decoder_depth=1", "model.num_heads=2", "model.decoder_num_heads=2",
        "data.batch_size=16"]


def cli(*args: object):
    return CliRunner().invoke(build_app(), [str(a) for a in args], env=ENV)


def loader(data, split: str = "train"):
    return build_loader(data, split=split, augment="none", img_size=8, seed=0, epoch=0)


def labelled_shards(root: Path, prefix: str, counts: list[int], classes: int = 2) -> None:
    """Shards `PREFIX-00000S.tar` of solid images labelled j % classes, no shards.json."""
    root.mkdir(parents=True, exist_ok=True)
    j = 0
    for s, n in enumerate(counts):
        members = []
        for _ in range(n):
            members += [(f"s{s}_{j}.png", encode(solid(37 * j))),
                        (f"s{s}_{j}.cls", b"%d" % (j % classes))]
            j += 1
        write_tar(root / f"{prefix}-{s:06d}.tar", members)


def image_tree(root: Path, classes: list[str], per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            solid(10 * c + i).save(root / name / f"{i}.png")
    return root


# --- messages that lead somewhere -----------------------------------------------------------


def test_an_unknown_key_suggests_the_nearest_valid_one(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[schedule]\nmax_step = 3\n[optim]\nepochs = 2\n[run]\nzzzz = 1\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(recipe)
    lines = str(err.value).splitlines()
    assert f"{recipe}: schedule.max_step: unknown key (did you mean schedule.max_steps?)" in lines
    assert f"{recipe}: optim.epochs: unknown key (did you mean schedule.epochs?)" in lines
    assert f"{recipe}: run.zzzz: unknown key" in lines  # nothing close: no guess


def test_a_bad_value_from_set_names_the_set_not_the_recipe_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[optim]\nlr = 0.1\n")
    with pytest.raises(BadInputError) as err:
        load_recipe(recipe, ["schedule.max_steps=0", "optim.lr=2e-4"])
    assert re.fullmatch(r"--set schedule\.max_steps=0: schedule\.max_steps: Input should be "
                        r"greater than 0 \(got 0\)", str(err.value)), str(err.value)
    recipe.write_text("[schedule]\nmax_steps = 0\n")  # from the file: the file is named
    with pytest.raises(BadInputError, match=rf"^{re.escape(str(recipe))}: schedule\.max_steps"):
        load_recipe(recipe, ["optim.lr=2e-4"])


def test_a_run_shorter_than_its_warm_up_warns_once(tmp_path: Path, caplog) -> None:
    from cratemae.tasks.pretrain import pretrain

    caplog.set_level(logging.INFO, logger="cratemae")
    pretrain(load_recipe(DEMO, [*TINY, "schedule.max_steps=2"]), out_dir=tmp_path / "a")
    warned = [r for r in caplog.records if "never reaches its peak" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    # the demo: 5,000 images / batch 16 = 312 steps per epoch, warm-up 1 epoch
    assert "the run is 2 steps, shorter than its 312 warm-up steps" in warned[0].getMessage()
    caplog.clear()
    pretrain(load_recipe(DEMO, [*TINY, "schedule.max_steps=2", "schedule.warmup_epochs=0"]),
             out_dir=tmp_path / "b")
    assert "never reaches its peak" not in caplog.text


def test_the_probe_warns_when_the_chosen_weight_decay_is_at_the_edge(caplog) -> None:
    from cratemae.tasks.probe import _warn_at_edge

    grid = (1e-4, 1e-3, 1e-2)
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        _warn_at_edge(grid, [50.0, 60.0, 70.0], 2)
        assert "0.01 is the largest of probe.weight_decays" in caplog.text
        _warn_at_edge((1e-2, 1e-4), [40.0, 45.0], 1)  # the grid need not be sorted
        assert "0.0001 is the smallest" in caplog.text
        caplog.clear()
        _warn_at_edge(grid, [50.0, 80.0, 70.0], 1)  # inside the grid
        _warn_at_edge(grid, [70.0, 70.0, 60.0], 0)  # ties its neighbour: nothing beyond
        _warn_at_edge((1e-3,), [70.0], 0)  # a grid of one: nothing to say
    assert not caplog.records


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_a_missing_onnx_package_is_one_line_naming_the_extra(
        demo_checkpoint: Path, tmp_path: Path, monkeypatch, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # the import fails as if not installed
    out = tmp_path / "onnx"
    run = cli("export", demo_checkpoint, "--out", out, "--format", "onnx")
    if package == "onnx":  # nothing can be written: refused before the folder is made
        assert run.exit_code != 0
        assert run.stderr == ("error: export --format onnx needs the onnx package, which is "
                              "not installed: pip install 'cratemae[onnx]'\n")
        assert not out.exists()
    else:  # written, unchecked, and the warning says what to install
        assert run.exit_code == 0, run.output
        assert "pip install 'cratemae[onnx]'" in run.stderr
        assert "Traceback" not in run.output and (out / "model.onnx").is_file()


def test_bench_data_measures_at_the_recipe_image_size() -> None:
    run = cli("bench-data", DEMO, "--batches", 2, "--num-workers", 0, "--json")
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["img_size"] == 32  # demo: 32 px
    run = cli("bench-data", DEMO, "--batches", 2, "--num-workers", 0, "--json",
              "--img-size", 16)
    assert json.loads(run.stdout.strip().splitlines()[-1])["img_size"] == 16


# --- data the way users have it -------------------------------------------------------------


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


def test_probe_reads_pipe_validation_data(demo_checkpoint: Path, tmp_path: Path,
                                          caplog) -> None:
    from cratemae.tasks.probe import probe

    labelled_shards(tmp_path / "d", "train", [20, 20])
    labelled_shards(tmp_path / "d", "val", [6, 6])
    recipe = load_recipe(PROBE_DEMO, [
        f'data.train="{tmp_path / "d" / "train-*.tar"}"',
        f'data.val="pipe:cat {tmp_path / "d"}/val-{{000000..000001}}.tar"',
        "data.batch_size=16", "probe.num_classes=2", "probe.weight_decays=[1e-4, 1e-2]",
        "probe.max_iter=20", f'probe.cache_dir="{tmp_path / "cache"}"'])
    caplog.set_level(logging.INFO, logger="cratemae")
    result = probe(recipe, demo_checkpoint, out_dir=tmp_path / "probe")
    assert result.summary["train_images"] == 40 and result.summary["val_images"] == 12
    assert "(fit 1 of 3)" in caplog.text and "(fit 3 of 3)" in caplog.text  # progress


def test_unlabelled_shards_given_to_probe_say_so_first(tmp_path: Path) -> None:
    members = [m for i in range(4) for m in [(f"k{i}.jpg", encode(solid(i), "JPEG")),
                                             (f"k{i}.txt", b"a caption")]]
    write_tar(tmp_path / "train-000000.tar", members)
    recipe = load_recipe(PROBE_DEMO, [f'data.train="{tmp_path}"', f'data.val="{tmp_path}"'])
    for wanted in (None, 10):
        with pytest.raises(BadInputError, match=r"^data\.train: .*holds no class labels"):
            resolve_num_classes(recipe, wanted, "probe.num_classes")


def test_class_names_that_differ_between_train_and_val_are_refused(tmp_path: Path,
                                                                   caplog) -> None:
    train = image_tree(tmp_path / "train", ["cat", "dog"])
    val = image_tree(tmp_path / "val", ["cat", "cow"])
    recipe = load_recipe(PROBE_DEMO, [f'data.train="{train}"', f'data.val="{val}"'])
    with pytest.raises(BadInputError,
                       match=r"label 1 is 'dog' in data\.train, 'cow' in data\.val"):
        resolve_num_classes(recipe, None, "probe.num_classes")
    labelled_shards(tmp_path / "numbered", "val", [4])  # .cls numbers, no names
    recipe = load_recipe(PROBE_DEMO, [f'data.train="{train}"',
                                      f'data.val="{tmp_path / "numbered"}"'])
    with caplog.at_level(logging.WARNING, logger="cratemae"):
        assert resolve_num_classes(recipe, None, "probe.num_classes") == 2
    assert "data.train names its classes (cat, dog" in caplog.text
    assert "numbered labels only" in caplog.text


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
