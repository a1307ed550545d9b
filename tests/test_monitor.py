"""Validation during pre-training (`run.eval_every_steps`): a seeded subset of data.val,
eval lines in metrics.jsonl, the k-NN monitor, per-layer coding rate and sparsity as
`analyze` measures them, the samples/ pictures, and the same figures in TensorBoard,
continued without repeats on resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import solid
from PIL import Image
from support import REPO

from cratemae.analysis import record_layers
from cratemae.checkpoints import Resume
from cratemae.data.plan import subset_plan
from cratemae.errors import BadInputError
from cratemae.eval.knn import knn_top1
from cratemae.eval.validation import subset_positions
from cratemae.recipe import load_recipe
from cratemae.tasks.monitor import PretrainMonitor
from cratemae.tasks.pretrain import MAETask, build_mae, pretrain

DEMO = REPO / "recipes" / "demo.toml"
DEPTH = 2
TINY = [
    "model.embed_dim=32", "model.decoder_embed_dim=32", f"model.depth={DEPTH}",
    "model.decoder_depth=1", "model.num_heads=2", "model.decoder_num_heads=2",
    "data.batch_size=32", "schedule.max_steps=4", "schedule.warmup_epochs=0.05",
    "run.log_every=1", "run.eval_images=64",
]


def recipe(*sets: str):
    return load_recipe(DEMO, [*TINY, *sets])


def lines(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind", "train") == kind]


def test_knn_is_the_weighted_vote_of_the_nearest_cosine_neighbours():
    # Two classes on opposite sides of the sphere: every test point is classified right.
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    train_y = torch.arange(40) % 2
    train = centres[train_y] + 0.1 * torch.randn(40, 3, generator=g)
    test_y = torch.tensor([0, 1, 1, 0])
    test = 5.0 * centres[test_y]  # the scale does not matter: cosine similarity
    assert knn_top1(train, train_y, test, test_y, k=5) == 100.0
    assert knn_top1(train, 1 - train_y, test, test_y, k=5) == 0.0
    # One very close neighbour of class 0 outweighs two farther ones of class 1 (k = 3);
    # a plain majority vote would say 1.
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    assert knn_top1(train, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]),
                    torch.tensor([0]), k=3) == 100.0


def test_val_loss_uses_fixed_masks_and_layers_match_analyze(tmp_path):
    torch.manual_seed(0)
    r = recipe("run.eval_every_steps=2")
    model = build_mae(r).eval()
    task = MAETask(r, model)
    first = task.monitor(model, 0, tmp_path)
    second = task.monitor(model, 0, tmp_path)
    assert first is not None and second is not None
    assert first["val_loss"] == second["val_loss"] and math.isfinite(first["val_loss"])
    assert first["eval_images"] == 64
    assert len(first["coding_rate"]) == len(first["sparsity"]) == DEPTH + 1
    # The means over the subset of what `record_layers` (cratemae analyze) measures.
    imgs = torch.cat([b.model_input("cpu") for b, _ in zip(task._monitor._loader("val"), range(2),
                                               strict=False)])
    rec = record_layers(model.encoder, imgs)
    assert first["coding_rate"] == pytest.approx(rec.coding_rate.mean(0).tolist(), rel=1e-6)
    assert first["sparsity"] == pytest.approx(rec.sparsity.mean(0).tolist(), rel=1e-6)
    picture = tmp_path / first["samples"]
    assert first["samples"] == "samples/step-000000000.png" and picture.is_file()
    assert Image.open(picture).height > 8 * 32  # eight rows of panels


def test_pretraining_writes_eval_lines_pictures_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pretrain(recipe("run.eval_every_steps=2", "schedule.max_steps=5"), run_dir=tmp_path)
    evals = lines(tmp_path, "eval")
    assert [e["step"] for e in evals] == [2, 4, 5]  # every 2 steps and at the end
    train = lines(tmp_path, "train")
    assert [t["step"] for t in train] == [1, 2, 3, 4, 5]
    for e in evals:
        assert math.isfinite(e["val_loss"])
        assert 0 <= e["val_knn_top1"] <= 100
        assert len(e["coding_rate"]) == len(e["sparsity"]) == DEPTH + 1
        assert all(0 <= s <= 1 for s in e["sparsity"])
        assert (tmp_path / e["samples"]).is_file()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step-000000002.png", "step-000000004.png", "step-000000005.png"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    expected = {"train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction",
                "val/loss", "val/knn_top1"} | {
        f"layers/{m}/{i}" for m in ("coding_rate", "sparsity") for i in range(DEPTH + 1)}
    assert expected <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in acc.Scalars("val/loss")] == pytest.approx(
        [e["val_loss"] for e in evals])
    assert [e.step for e in acc.Images("val/reconstructions")] == [2, 4, 5]


def test_knn_monitor_is_above_chance_after_training(tmp_path):
    """10 balanced demo classes: chance is 10%."""
    pretrain(recipe("run.eval_every_steps=10", "schedule.max_steps=10",
                    "run.eval_images=128", "run.log_every=10", "run.loggers=[]"),
             run_dir=tmp_path)
    (last,) = lines(tmp_path, "eval")
    assert last["val_knn_top1"] > 20


def test_no_validation_without_data_val(tmp_path, caplog):
    caplog.set_level("INFO", logger="cratemae")
    r = recipe("run.eval_every_steps=2")
    r = r.model_copy(update={"data": r.data.model_copy(update={"val": None})})
    pretrain(r, run_dir=tmp_path)
    assert lines(tmp_path, "eval") == []
    assert caplog.text.count("data.val is not set: no validation") == 1


def test_resumed_run_continues_the_curves_without_repeating_a_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = ("run.eval_every_steps=2", "run.checkpoint_every_steps=2", "run.keep_last=3")
    pretrain(recipe(*sets), run_dir=tmp_path)
    # Resume from step 2: steps 3 and 4 (and their evaluation) were logged and come again.
    pretrain(recipe(*sets), run_dir=tmp_path,
             resume=Resume.parse(tmp_path / "checkpoints" / "step-000000002"))
    assert [t["step"] for t in lines(tmp_path, "train")] == [1, 2, 3, 4]
    assert [e["step"] for e in lines(tmp_path, "eval")] == [2, 4]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]


def class_sorted_folder(root: Path, classes: int = 10, per_class: int = 20) -> Path:
    """An image folder whose listing is sorted by class: c0/ first, c9/ last."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(per_class):
            solid(c * per_class + j).save(root / f"c{c}" / f"{j:03d}.png")
    return root


def subset_of(monitor: PretrainMonitor, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the monitor's subset of `split`, as an evaluation reads them."""
    batches = list(monitor._loader(split))
    return torch.cat([b.images for b in batches]), torch.cat([b.labels for b in batches])


def test_the_subset_is_a_seeded_draw_over_all_of_a_class_sorted_folder(tmp_path):
    folder = class_sorted_folder(tmp_path / "images")
    sets = (f'data.train="{folder}"', f'data.val="{folder}"', "run.eval_images=32",
            "data.batch_size=8", "data.num_workers=0")
    r = recipe(*sets, "run.seed=3")
    first = PretrainMonitor(r, torch.device("cpu"), r.model.img_size)
    images, labels = subset_of(first, "val")
    assert len(labels) == 32 and len(set(labels.tolist())) >= 6  # the first 32: 2 classes
    again = subset_of(first, "val")  # the next evaluation
    twin = subset_of(PretrainMonitor(r, torch.device("cpu"), r.model.img_size), "val")
    for other in (again, twin):
        assert torch.equal(other[0], images) and torch.equal(other[1], labels)
    r7 = recipe(*sets, "run.seed=7")
    _, labels7 = subset_of(PretrainMonitor(r7, torch.device("cpu"), r7.model.img_size), "val")
    assert not torch.equal(labels7, labels)
    # The k-NN's data.train draw spans the classes too, and is not the val draw.
    _, train_labels = subset_of(first, "train")
    assert len(set(train_labels.tolist())) >= 6 and not torch.equal(train_labels, labels)


def test_subset_positions_are_distinct_sorted_and_fixed_by_the_seed():
    a = subset_positions(1_281_167, 1000, 0, "val")
    assert len(set(a.tolist())) == 1000 and (np.diff(a) > 0).all() and a[-1] < 1_281_167
    assert np.array_equal(a, subset_positions(1_281_167, 1000, 0, "val"))
    assert not np.array_equal(a, subset_positions(1_281_167, 1000, 1, "val"))
    assert np.array_equal(subset_positions(5, 1000, 0, "val"), np.arange(5))  # all of it


def test_subset_plan_reads_exactly_the_positions_in_batches_dealt_to_streams():
    from cratemae.data.shards import Shard
    from cratemae.data.sources import Source

    source = Source(tuple(Shard(f"s{i}.tar", 10) for i in range(3)))  # positions 0..29
    positions = np.array([1, 2, 3, 9, 10, 17, 25, 29])
    plan = subset_plan(source, positions, batch_size=3, num_streams=2)
    assert (plan.num_batches, plan.num_samples, plan.last_size) == (3, 8, 2)
    # As every evaluation plan: stream 0 makes batches 0 and 2 from the first 5 samples
    # (positions 1, 2, 3, 9, 10), stream 1 batch 1 from the last 3 (17, 25, 29).
    assert plan.streams[0].segments == ((0, 1, 4), (0, 9, 10), (1, 0, 1))
    assert plan.streams[1].segments == ((1, 7, 8), (2, 5, 6), (2, 9, 10))
    assert [list(s.batch_ids()) for s in plan.streams] == [[0, 2], [1]]
    with pytest.raises(BadInputError, match="outside"):
        subset_plan(source, np.array([3, 30]), batch_size=3, num_streams=1)
