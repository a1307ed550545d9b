"""The loggers (`run.loggers`): the names each metrics record is logged under, TensorBoard on
by default and off with [], W&B offline where it is installed; fine-tuning logs there too."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import REPO, SMALLEST_MODEL

from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import pretrain
from cratemae.train.loggers import Loggers, scalars

DEMO = REPO / "recipes" / "demo.toml"
TINY = [
    *SMALLEST_MODEL, "data.batch_size=32",
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
    pretrain(load_recipe(DEMO, TINY), run_dir=tmp_path / "default")
    assert list((tmp_path / "default" / "tensorboard").glob("events.out.tfevents.*"))
    pretrain(load_recipe(DEMO, [*TINY, "run.loggers=[]"]), run_dir=tmp_path / "off")
    assert not (tmp_path / "off" / "tensorboard").exists()
    assert (tmp_path / "off" / "metrics.jsonl").is_file()  # always written


def test_an_unknown_logger_is_refused_by_the_recipe():
    with pytest.raises(BadInputError, match=r"run\.loggers"):
        load_recipe(DEMO, [*TINY, 'run.loggers=["mlflow"]'])


def offline_wandb(tmp_path: Path, monkeypatch) -> None:
    """W&B installed, offline, silent, and everything it writes under `tmp_path`."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "wandb-home" / "xdg"))
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run's .wandb file: W&B's LevelDB-style log (a
    7-byte `:W&B` header, then 32 KiB blocks of chunks `crc32 u32, length u16, type u8`,
    type 1 = whole record, 2/3/4 = first/middle/last piece)."""
    from wandb.proto import wandb_internal_pb2

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", data[:head]
    pos, pieces = head, b""
    while pos + head <= len(data):
        if block - pos % block < head:  # a block's tail too short for a chunk is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        if kind == 0 or pos + head + length > len(data):  # the end, or a chunk being written
            break
        pieces += data[pos + head:pos + head + length]
        pos += head + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_logged(run_file: Path) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """(history: step -> {name: value}, the last summary) of an offline run, W&B's own keys
    (`_step`, `_runtime`, ...) left out. W&B's service process writes the file after
    `finish()` returns: wait (up to a minute) for its closing `exit` record."""
    deadline = time.monotonic() + 60
    records = list(wandb_records(run_file))
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, f"{run_file}: no exit record after 60 s"
        time.sleep(0.2)
        records = list(wandb_records(run_file))
    history: dict[int, dict[str, float]] = {}
    summary: dict[str, float] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        items = (record.history.item if kind == "history" else
                 record.summary.update if kind == "summary" else [])
        values = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}
        values = {k: v for k, v in values.items() if not k.startswith("_")}
        if kind == "history":
            history.setdefault(record.history.step.num, {}).update(values)
        elif kind == "summary":
            summary.update(values)
    return history, summary


@pytest.mark.slow  # two offline W&B runs: 2 s warm, about 10 s cold (wandb-core starts)
def test_wandb_logs_offline_and_keeps_its_run_id_for_resume(tmp_path, monkeypatch):
    offline_wandb(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    loggers = Loggers(run_dir, ["wandb"], resume_step=None, config={"a": 1})
    loggers.write({"kind": "train", "step": 1, "loss": 0.5, "lr": 0.1})
    loggers.write({"kind": "train", "step": 2, "loss": 0.25, "lr": 0.05})
    loggers.write({"kind": "eval", "step": 2, "val_loss": 0.75, "coding_rate": [1.5, 2.5],
                   "eval_images": 64})
    loggers.close()
    run_id = (run_dir / "wandb-id.txt").read_text().strip()
    (run_file,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history, summary = wandb_logged(run_file)
    assert history == {1: {"train/loss": 0.5, "train/lr": 0.1},
                       2: {"train/loss": 0.25, "train/lr": 0.05, "val/loss": 0.75,
                           "layers/coding_rate/0": 1.5, "layers/coding_rate/1": 2.5}}
    assert summary == history[2]  # the last value of each curve
    Loggers(run_dir, ["wandb"], resume_step=1, config={"a": 1}).close()
    assert (run_dir / "wandb-id.txt").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1  # same id


def test_finetuning_logs_its_evaluations_to_tensorboard(tmp_path, demo_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cratemae.tasks.finetune import finetune

    r = load_recipe(REPO / "recipes" / "finetune" / "demo.toml", [
        "data.batch_size=64", "schedule.epochs=1", "schedule.max_steps=3",
        "run.log_every=1", "finetune.randaugment=false", "finetune.mixup=0",
        "finetune.cutmix=0"])
    finetune(r, demo_checkpoint, run_dir=tmp_path)
    records = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in records if e.get("kind") == "eval"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/top1")] == [e["step"] for e in evals]
    assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx(
        [e["top1"] for e in evals])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
