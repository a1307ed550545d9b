"""`cratemae finetune`: per-epoch evaluation, best and last checkpoints, EMA, exact resume,
another image size, bad input; and (slow) fine-tuning beats the linear probe."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from data_fixtures import shape_folders
from support import REPO
from typer.testing import CliRunner

from cratemae.checkpoints import load_checkpoint, read_model_weights
from cratemae.commands.app import build_app
from cratemae.data.demo import CLASSES
from cratemae.model import CrateMAEConfig
from cratemae.recipe import load_recipe
from cratemae.tasks.finetune import finetune
from cratemae.tasks.probe import probe
from cratemae.train.trainer import Preempted

FINETUNE = REPO / "recipes" / "finetune" / "demo.toml"
PROBE = REPO / "recipes" / "probe" / "demo.toml"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Image folders (class sub-folders) of demo shapes: 3 classes x 8 train, x 4 val."""
    return shape_folders(tmp_path_factory.mktemp("shapes"), train=8, val=4)


def small(folders, *sets: str):
    """Batch 8 of 24 images: 3 steps per epoch; EMA and mixup/cutmix on."""
    return load_recipe(FINETUNE, [
        f'data.train="{folders[0]}"', f'data.val="{folders[1]}"', "data.batch_size=8",
        "schedule.warmup_epochs=1", "finetune.ema=true", "finetune.ema_decay=0.5",
        "finetune.mixup=0.8", "finetune.cutmix=1.0", "model.img_size=48", "run.log_every=1",
        *sets])


def evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "eval"]


def test_evaluates_every_epoch_keeps_best_and_last_and_resumes_exactly(
        tmp_path, demo_checkpoint, folders):
    whole = finetune(small(folders, "schedule.epochs=2"), demo_checkpoint,
                     run_dir=tmp_path / "whole")
    assert [(e["step"], e["epoch"]) for e in whole.evals] == [(3, 1), (6, 2)]
    assert all(e["images"] == 12 and "ema_top1" in e for e in whole.evals)
    assert evals(tmp_path / "whole") == whole.evals
    best = json.loads((tmp_path / "whole" / "best" / "best.json").read_text())
    assert best["top1"] == max(max(e["top1"], e["ema_top1"]) for e in whole.evals)
    weights, config = read_model_weights(tmp_path / "whole" / "best" / "model.safetensors")
    assert weights["head.weight"].shape == (3, 64) and config["img_size"] == 48
    last = load_checkpoint(whole.last_checkpoint)
    assert any(k.startswith("ema.") for k in last.model_state)
    summary = json.loads((tmp_path / "whole" / "finetune.json").read_text())
    assert summary["final"]["step"] == 6 and summary["best"]["top1"] == best["top1"]
    assert summary["class_names"] == list(CLASSES[:3])  # label i is class_names[i]


    def stop_at_3(record):  # the end of epoch 1, after its evaluation
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted):
        finetune(small(folders, "schedule.epochs=2"), demo_checkpoint,
                 run_dir=tmp_path / "split", on_log=stop_at_3)
    resumed = finetune(small(folders, "schedule.epochs=2"), demo_checkpoint,
                       run_dir=tmp_path / "split")
    assert [e["step"] for e in resumed.evals] == [6]
    assert evals(tmp_path / "split") == whole.evals  # one run's records, as if uninterrupted
    a = load_checkpoint(whole.last_checkpoint).model_state
    b = load_checkpoint(resumed.last_checkpoint).model_state
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # mixup, EMA, optimizer, data: all exact
    assert resumed.best == whole.best | {"path": resumed.best["path"]}


def test_layer_wise_lr_decay_scales_each_depth(folders, demo_checkpoint):
    from cratemae.tasks.finetune import FinetuneTask
    from cratemae.weights.load import load_encoder

    recipe = small(folders, "finetune.layer_decay=0.5")
    encoder, config = load_encoder(demo_checkpoint, recipe.model)
    groups = FinetuneTask(recipe, encoder, config, 3).param_groups()
    names = {id(p): n for n, p in encoder.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    # depth 2: stem 0.5^3, blocks.0 0.5^2, blocks.1 and the final norm 0.5, head 1
    assert scale["patch_embed.proj.weight"] == scale["cls_token"] == 0.125
    assert scale["blocks.0.ista.dictionary"] == 0.25
    assert scale["blocks.1.mssa.u_proj.weight"] == scale["norm.weight"] == 0.5
    assert scale["head.weight"] == scale["head.bias"] == 1.0
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert decay["head.bias"] == decay["cls_token"] == 0.0 and decay["head.weight"] > 0


@pytest.mark.parametrize(("sets", "message"), [
    (["finetune.num_classes=5"], "finetune.num_classes = 5, but data.train has 3 classes"),
    (["model.depth=7"], "model.depth = 7, but"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, demo_checkpoint, folders, sets, message):
    args = ["finetune", str(FINETUNE), "--checkpoint", str(demo_checkpoint), "--out",
            str(tmp_path), f'--set=data.train="{folders[0]}"', f'--set=data.val="{folders[1]}"',
            *[f"--set={s}" for s in sets]]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.longest(2)
def test_finetuning_beats_the_linear_probe(tmp_path, demo_checkpoint):
    lin = probe(load_recipe(PROBE, [f'probe.cache_dir="{tmp_path}"']), demo_checkpoint,
                run_dir=tmp_path / "probe")
    ft = finetune(load_recipe(FINETUNE), demo_checkpoint, run_dir=tmp_path / "ft")
    final = ft.evals[-1]["top1"]
    print(f"\ndemo top-1: linear probe {lin.top1:.2f}%, fine-tuned {final:.2f}% "
          f"(best {ft.best['top1']:.2f}%)")
    assert final > lin.top1


def test_fine_tuning_applies_the_recipes_drop_path_rate() -> None:
    from cratemae.model import CrateEncoder
    from cratemae.model.layers import DropPath
    from cratemae.tasks.finetune import FinetuneTask

    recipe = load_recipe(REPO / "recipes" / "finetune" / "demo.toml",
                         ["finetune.drop_path_rate=0.2", "finetune.mixup=0", "finetune.cutmix=0"])
    encoder = CrateEncoder(CrateMAEConfig(img_size=16, patch_size=8, embed_dim=8, depth=3,
                                          num_heads=2, decoder_embed_dim=8, decoder_depth=1,
                                          decoder_num_heads=2))
    FinetuneTask(recipe, encoder, encoder.config.to_dict(), num_classes=4)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0
             for b in encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])  # rising to the recipe's rate
    assert load_recipe(REPO / "recipes" / "finetune" / "in1k.toml").finetune.drop_path_rate == 0.1
