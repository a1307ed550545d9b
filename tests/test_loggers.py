"""The loggers (`run.loggers`): the names each metrics record is logged under, TensorBoard on
by default and off with [], W&B offline where it is installed; fine-tuning logs there too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import pretrain
from cratemae.train.loggers import Loggers, scalars

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo.toml"
TINY = [
    "model.embed_dim=32", "model.decoder_embed_dim=32", "model.depth=1", "model.decoder_depth=1",
    "model.num_heads=2", "model.decoder_num_heads=2", "data.batch_size=32",
    "schedule.max_steps=2", "schedule.warmup_epochs=0.05", "run.log_every=1",
]


def test_train_eval_and_layer_records_are_named_as_tensorboard_shows_them():
    train = {"step": 3, "epoch": 0, "loss": 0.5, "lr": 1e-3, "images_per_s": 100.0,
             "data_wait_fraction": 0.25, "max_memory_gb": 1.0, "total_steps": 9}
    assert scalars(train) == {"train/loss": 0.5, "train/lr": 1e-3, "train/images_per_s": 100.0,
                              "train/data_wait_fraction": 0.25}
    assert scalars({**train, "kind": "train"}) == scalars(train)  # old lines have no kind
    evaluation = {"kind": "eval", "step": 3, "epoch": 0, "val_loss": 0.7, "val_knn_top1": 40.0,
                  "coding_rate": [1.0, 2.0], "sparsity": [0.5, 0.25], "eval_images": 64,
                  "samples": "samples/step-000000003.png", "eval_seconds": 1.5}
    assert scalars(evaluation) == {
        "val/loss": 0.7, "val/knn_top1": 40.0, "layers/coding_rate/0": 1.0,
        "layers/coding_rate/1": 2.0, "layers/sparsity/0": 0.5, "layers/sparsity/1": 0.25}
    finetune = {"kind": "eval", "step": 8, "epoch": 1, "top1": 50.0, "top5": 90.0,
                "best": True}
    assert scalars(finetune) == {"val/top1": 50.0, "val/top5": 90.0}


def test_tensorboard_by_default_and_none_with_an_empty_list(tmp_path):
    pretrain(load_recipe(DEMO, TINY), out_dir=tmp_path / "default")
    assert list((tmp_path / "default" / "tensorboard").glob("events.out.tfevents.*"))
    pretrain(load_recipe(DEMO, [*TINY, "run.loggers=[]"]), out_dir=tmp_path / "off")
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert (tmp_path / "off" / "metrics.jsonl").is_file()  # always written


def test_an_unknown_logger_is_refused_by_the_recipe():
    with pytest.raises(BadInputError, match=r"run\.loggers"):
        load_recipe(DEMO, [*TINY, 'run.loggers=["mlflow"]'])


def test_wandb_logs_offline_and_keeps_its_run_id_for_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = Loggers(tmp_path, ["wandb"], resume_step=None, config={"a": 1})
    loggers.write({"kind": "train", "step": 1, "loss": 0.5, "lr": 0.1})
    loggers.close()
    run_id = (tmp_path / "wandb-id.txt").read_text().strip()
    assert run_id and list((tmp_path / "wandb").glob(f"*{run_id}*"))
    Loggers(tmp_path, ["wandb"], resume_step=1, config={"a": 1}).close()
    assert (tmp_path / "wandb-id.txt").read_text().strip() == run_id


def test_finetuning_logs_its_evaluations_to_tensorboard(tmp_path, demo_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cratemae.tasks.finetune import finetune

    r = load_recipe(REPO / "recipes" / "finetune" / "demo.toml", [
        "data.batch_size=64", "schedule.epochs=1", "schedule.max_steps=3",
        "run.log_every=1", "finetune.randaugment=false", "finetune.mixup=0",
        "finetune.cutmix=0"])
    finetune(r, demo_checkpoint, out_dir=tmp_path)
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in records if e.get("kind") == "eval"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/top1")] == [e["step"] for e in evals]
    assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx(
        [e["top1"] for e in evals])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
