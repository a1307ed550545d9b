"""Results belong to the checkpoint they name: probe and finetune record the weights they
started from, refuse a run directory that holds the run of other weights, and by default
write into a directory named after the checkpoint's run; the images are normalised as the
checkpoint was trained unless the recipe says otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from data_fixtures import shape_folders
from support import cli

from cratemae.checkpoints import write_model_weights
from cratemae.model import create_model
from cratemae.train.setup import default_run_dir

MEAN, STD = [0.1, 0.2, 0.3], [0.3, 0.35, 0.4]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    """Image folders of demo shapes: 3 classes x 4 train, x 2 val (32 px)."""
    return shape_folders(tmp_path_factory.mktemp("shapes"), train=4, val=2)


def make_run(where: Path, seed: int, mean=MEAN, std=STD) -> Path:
    """A run directory holding the weights of a 1-layer model (seeded) and the record of the
    mean/std it was trained with, as an export records them."""
    torch.manual_seed(seed)
    mae = create_model("crate_mae_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1,
                       num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    where.mkdir(parents=True)
    (where / "recipe.toml").write_text("")  # what makes it a run
    write_model_weights(where / "model.safetensors", mae.state_dict(), mae.config.to_dict())
    (where / "config.json").write_text(json.dumps({"mean": mean, "std": std}))
    return where


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    """./runs with two runs of different weights, `demo` and `preempt`, in a fresh folder."""
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "demo", seed=0)
    make_run(tmp_path / "runs" / "preempt", seed=1)
    return Path("runs")


def data_sets(shapes) -> list[str]:
    return [f"--set=data.train=\"{shapes[0]}\"", f"--set=data.val=\"{shapes[1]}\"",
            "--set=data.batch_size=4", "--set=probe.weight_decays=[1e-3]",
            "--set=probe.max_iter=1", "--set=run.precision=\"fp32\""]


def probe(checkpoint, shapes, *extra):
    return cli("probe", "probe/demo", "--checkpoint", checkpoint, *data_sets(shapes), *extra)


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- where a run goes -------------------------------------------------------------------------
def test_default_run_directory_is_named_after_the_checkpoints_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path / "runs" / "demo", seed=0)
    make_run(tmp_path / "runs" / "sweep" / "a", seed=0)
    make_run(tmp_path / "elsewhere" / "big", seed=0)
    (tmp_path / "exported" / "base").mkdir(parents=True)
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "exported" / "base" / "model.safetensors").write_bytes(b"")
    assert default_run_dir("runs/demo", "probe", "demo") == Path("runs/demo-probe")
    assert default_run_dir("runs/demo", "finetune", "demo") == Path("runs/demo-finetune")
    assert default_run_dir("runs/demo", "probe", "cifar10") == Path("runs/demo-cifar10-probe")
    assert default_run_dir("runs/sweep/a", "probe") == Path("runs/sweep/a-probe")
    assert default_run_dir(tmp_path / "elsewhere/big", "probe") == Path("runs/big-probe")
    assert default_run_dir("exported/base", "probe") == Path("runs/base-probe")
    assert default_run_dir("exported/base/model.safetensors", "probe") == Path(
        "runs/base-probe")
    assert default_run_dir("w.safetensors", "finetune") == Path("runs/w-finetune")


# --- results belong to the checkpoint they name -----------------------------------------------
def test_a_second_probe_of_other_weights_lands_in_its_own_directory(runs, shapes):
    first = probe("runs/demo", shapes)
    assert first.exit_code == 0, first.output
    second = probe("runs/preempt", shapes)
    assert second.exit_code == 0, second.output
    # named after the checkpoint's run, and the recipe's name where it differs
    mine, theirs = read(runs / "demo-probe" / "probe.json"), read(
        runs / "preempt-demo-probe" / "probe.json")
    assert mine["checkpoint"] == "runs/demo" and theirs["checkpoint"] == "runs/preempt"
    assert mine["checkpoint_sha256"] == digest(runs / "demo" / "model.safetensors")
    assert theirs["checkpoint_sha256"] == digest(runs / "preempt" / "model.safetensors")
    # the next lines run where the user is: shipped recipes by name
    assert "cratemae finetune finetune/demo --checkpoint runs/preempt" in second.output
    assert "recipes/" not in second.output


def test_a_probe_into_the_directory_of_another_checkpoints_probe_is_refused(runs, shapes):
    assert probe("runs/demo", shapes).exit_code == 0
    before = (runs / "demo-probe" / "probe.json").read_bytes()
    again = probe("runs/preempt", shapes, "--out", "runs/demo-probe")
    assert again.exit_code == 2, again.output
    assert "runs/demo " in again.output and "runs/preempt " in again.output
    assert (runs / "demo-probe" / "probe.json").read_bytes() == before
    forced = probe("runs/preempt", shapes, "--out", "runs/demo-probe", "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert read(runs / "demo-probe" / "probe.json")["checkpoint"] == "runs/preempt"
    # the replaced run's log lines go with it: log.txt tells of one run
    log = (runs / "demo-probe" / "log.txt").read_text()
    assert "runs/preempt" in log and "runs/demo " not in log and "runs/demo\n" not in log


def test_the_same_bytes_by_another_path_or_a_link_are_the_same_checkpoint(runs, shapes):
    assert probe("runs/demo", shapes).exit_code == 0
    shutil.copytree(runs / "demo", "copy")
    (runs / "link").symlink_to("demo")
    for other in ("copy", "runs/link"):
        again = probe(other, shapes, "--out", "runs/demo-probe")
        assert again.exit_code == 0, again.output
        assert read(runs / "demo-probe" / "probe.json")["checkpoint"] == other
    link = probe("runs/link", shapes)  # its own default directory, named after the link
    assert link.exit_code == 0 and (runs / "link-demo-probe" / "probe.json").is_file()


@pytest.mark.parametrize("out", ["runs/demo", "runs"])
def test_out_over_the_checkpoints_own_run_is_refused(runs, shapes, out):
    before = sorted(p.name for p in (runs / "demo").iterdir())
    result = probe("runs/demo", shapes, "--out", out, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "being read" in result.output
    assert sorted(p.name for p in (runs / "demo").iterdir()) == before


def test_a_corrupt_result_file_is_refused_until_overwrite(runs, shapes):
    out = runs / "demo-probe"
    out.mkdir()
    (out / "recipe.toml").write_text("")
    (out / "probe.json").write_text('{"top1": 5')
    result = probe("runs/demo", shapes)
    assert result.exit_code == 2, result.output
    assert "probe.json: unreadable" in result.output
    assert (out / "probe.json").read_text() == '{"top1": 5'
    assert probe("runs/demo", shapes, "--overwrite").exit_code == 0
    assert read(out / "probe.json")["checkpoint"] == "runs/demo"


def test_a_pre_training_run_is_no_place_for_a_probe(runs, shapes):
    before = sorted(p.name for p in Path("runs/preempt").rglob("*"))
    result = probe("runs/demo", shapes, "--out", "runs/preempt")
    assert result.exit_code == 2, result.output
    assert "records no checkpoint" in result.output
    # --overwrite replaces a probe's results, never a run of another kind: nothing goes
    forced = probe("runs/demo", shapes, "--out", "runs/preempt", "--overwrite")
    assert forced.exit_code == 2 and "replaces only a probe's results" in forced.output
    assert sorted(p.name for p in Path("runs/preempt").rglob("*")) == before


# --- evaluation follows the checkpoint --------------------------------------------------------
def test_the_probe_normalises_with_the_checkpoints_mean_and_std(runs, shapes):
    result = probe("runs/demo", shapes)
    assert result.exit_code == 0, result.output
    out = runs / "demo-probe"
    recipe = read_toml(out / "recipe.toml")
    assert recipe["data"]["mean"] == MEAN and recipe["data"]["std"] == STD
    assert recipe["run"]["out_dir"] == "runs/demo-probe"
    assert "recipe's" not in (out / "log.txt").read_text()
    # probe.json: percentages to 2 decimals, no top-5 of 3 classes (always 100%)
    summary = read(out / "probe.json")
    assert summary["num_classes"] == 3 and summary["top5"] is None
    assert summary["top1"] == round(summary["top1"], 2)
    assert all(g["holdout_top1"] == round(g["holdout_top1"], 2) for g in summary["grid"])
    assert "top-5" not in result.output


def test_a_mean_the_recipe_sets_wins_and_the_log_says_so(runs, shapes):
    result = probe("runs/demo", shapes, "--set=data.mean=[0.5, 0.5, 0.5]")
    assert result.exit_code == 0, result.output
    recipe = read_toml(runs / "demo-probe" / "recipe.toml")
    assert recipe["data"]["mean"] == [0.5, 0.5, 0.5] and recipe["data"]["std"] == STD
    said = [line for line in (runs / "demo-probe" / "log.txt").read_text().splitlines()
            if "normalising with the recipe's mean, not the checkpoint's" in line]
    assert len(said) == 1, said


def read_toml(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


# --- fine-tuning ------------------------------------------------------------------------------
def finetune(checkpoint, shapes, *extra):
    return cli("finetune", "finetune/demo", "--checkpoint", checkpoint,
               f"--set=data.train=\"{shapes[0]}\"", f"--set=data.val=\"{shapes[1]}\"",
               "--set=data.batch_size=4", "--set=schedule.max_steps=1",
               "--set=schedule.warmup_epochs=0", *extra)


def test_a_finetune_records_its_checkpoint_and_another_ones_is_refused(runs, shapes):
    first = finetune("runs/demo", shapes)
    assert first.exit_code == 0, first.output
    out = runs / "demo-finetune"
    summary = read(out / "finetune.json")
    assert summary["checkpoint"] == "runs/demo"
    assert summary["checkpoint_sha256"] == digest(runs / "demo" / "model.safetensors")
    assert read(out / "status.json")["checkpoint_sha256"] == summary["checkpoint_sha256"]
    assert read_toml(out / "recipe.toml")["data"]["mean"] == MEAN
    before = (out / "finetune.json").read_bytes()
    other = finetune("runs/preempt", shapes, "--out", str(out))
    assert other.exit_code == 2, other.output
    assert "runs/demo " in other.stderr and "runs/preempt " in other.stderr
    assert "already finished" not in other.output
    assert (out / "finetune.json").read_bytes() == before
    shutil.copytree(runs / "demo", "copy")  # the same bytes elsewhere: the same run
    again = finetune("copy", shapes, "--out", str(out))
    assert again.exit_code == 0 and "already finished" in again.stdout, again.output


def test_a_stopped_finetune_resumes_only_with_its_own_weights(runs, shapes):
    """What resume reads (status.json) names the weights before any result exists."""
    out = runs / "demo-finetune"
    out.mkdir()
    (out / "recipe.toml").write_text("")
    (out / "status.json").write_text(json.dumps({
        "state": "stopped", "checkpoint": "runs/demo",
        "checkpoint_sha256": digest(runs / "demo" / "model.safetensors")}))
    other = finetune("runs/preempt", shapes, "--out", str(out))
    assert other.exit_code == 2 and "runs/demo " in other.stderr, other.output
    assert read(out / "status.json")["state"] == "stopped"


def test_a_run_older_than_the_records_is_known_by_its_log_line(tmp_path):
    from cratemae.train.run_dir import recorded_source

    run = tmp_path / "old"
    run.mkdir()
    (run / "recipe.toml").write_text("")
    assert recorded_source(run) == {}  # a run that names no checkpoint (pre-training)
    (run / "log.txt").write_text("2026-01-01 INFO fine-tuning runs/demo (3 classes, 32 px) "
                                 "in runs/old, 1 process(es) on cpu\n")
    assert recorded_source(run) == {"checkpoint": "runs/demo"}
    assert recorded_source(tmp_path / "none") is None
