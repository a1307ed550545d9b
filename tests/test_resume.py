"""Exact resume beyond what tests/test_pretrain.py covers: the random-number-generator states
a checkpoint carries are put back, and a run interrupted after an epoch ended repeats the
uninterrupted one step for step.

Pre-training seeds its masks by micro-batch and its data order and crops by epoch, so a
resume that forgot the global RNG states still repeats the demo run of test_pretrain.py
exactly: the RNG tests here draw from the global generators themselves, as anything a task
did not seed would (dropout, say).
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import shards_with_bad
from support import REPO

from cratemae.checkpoints import Resume, find_resume, load_checkpoint
from cratemae.errors import BadInputError
from cratemae.recipe import load_recipe
from cratemae.tasks.pretrain import MAETask, pretrain
from cratemae.train.state import TrainState, restore_run, save_run
from cratemae.train.trainer import Preempted

DEMO = REPO / "recipes" / "demo.toml"
# 32 samples of 16 px in two shards, 8 a batch: 4 steps an epoch, 2 epochs. Two samples are
# corrupt (skipped, counted): the counter must carry over a resume too.
TINY = [
    "model.img_size=16", "model.embed_dim=64", "model.decoder_embed_dim=64", "model.depth=2",
    "model.decoder_depth=1", "data.batch_size=8", "data.shuffle_buffer=8",
    "data.max_bad_fraction=0.5", "schedule.epochs=2", "schedule.warmup_epochs=0.5",
    "run.log_every=1",
]
STEPS_PER_EPOCH, EPOCHS = 4, 2
COMPARED = ("step", "epoch", "loss", "lr", "bad_samples", "nonfinite_skipped")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shards_with_bad(tmp_path_factory.mktemp("shards"), [16, 16], {5, 22})[0]


def recipe(shards: Path, *sets: str):
    return load_recipe(DEMO, [*TINY, f'data.train="{shards}"', *sets])


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, lines)]


def weights(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.last_checkpoint).model_state


def reseed_global_rngs(seed: int) -> None:
    """torch is seeded by every run; numpy's and python's global generators are not."""
    np.random.seed(seed)
    random.seed(seed)


def interrupted_then_resumed(shards: Path, run_dir: Path, stop_at: int, between=None):
    """Stop the run by SIGUSR1 at the end of step `stop_at`, call `between()`, resume."""

    def stop(record: dict) -> None:
        if record["step"] == stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted):
        pretrain(recipe(shards), run_dir=run_dir, on_log=stop)
    assert records(run_dir)[-1]["step"] == stop_at
    if between is not None:
        between()
    return pretrain(recipe(shards), run_dir=run_dir)


def _draws() -> list:
    return [torch.rand(3).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(),
            random.random(), random.getrandbits(64)]


def test_restore_run_puts_back_the_rng_states_saved_with_the_checkpoint(tmp_path):
    r = load_recipe(DEMO, TINY)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1), reseed_global_rngs(1)
    path = save_run(tmp_path, model=model, config={}, optimizer=optimizer, scaler=scaler,
                    state=TrainState(step=3, batch=3), recipe=r, end_of_epoch=False)
    after_save = _draws()
    torch.manual_seed(2), reseed_global_rngs(2)  # what a fresh process would hold
    state = restore_run(path, model=model, optimizer=optimizer, scaler=scaler, recipe=r)
    assert state.step == 3
    assert _draws() == after_save  # torch, numpy and python each continue where they were


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, shards: Path):
    """The uninterrupted two-epoch run."""
    run_dir = tmp_path_factory.mktemp("whole")
    result = pretrain(recipe(shards), run_dir=run_dir)
    assert result.state.step == STEPS_PER_EPOCH * EPOCHS
    return run_dir, result


@pytest.mark.parametrize("stop_at", [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2],
                         ids=["at-the-end-of-epoch-0", "inside-epoch-1"])
def test_resume_after_an_epoch_ended_repeats_the_uninterrupted_run(tmp_path, shards, whole,
                                                                   stop_at):
    whole_dir, whole_result = whole
    resumed = interrupted_then_resumed(shards, tmp_path, stop_at)
    assert resumed.state.step == STEPS_PER_EPOCH * EPOCHS and resumed.state.epoch == EPOCHS
    assert records(tmp_path) == records(whole_dir)  # losses bit for bit, epochs, bad counts
    assert records(tmp_path)[-1]["bad_samples"] == 2 * EPOCHS
    a, b = weights(whole_result), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_the_global_random_streams(tmp_path, shards, monkeypatch):
    """Masks drawn from torch's, numpy's and python's global generators (not the task's
    seeded one): the resumed run equals the whole one only if all three are restored.

    Stopped at an epoch's end: torch's DataLoader draws its base seed from torch's global
    generator whenever an epoch's iterator is made, and a run resumed inside an epoch makes
    one more iterator than the uninterrupted run."""

    def global_noise(self, batch_size: int, micro: int) -> torch.Tensor:
        L = self.model.config.num_patches
        noise = torch.rand(batch_size, L) + torch.from_numpy(np.random.rand(batch_size, L))
        noise = noise + torch.tensor([[random.random() for _ in range(L)]
                                      for _ in range(batch_size)], dtype=noise.dtype)
        return noise.float()  # (B, L)

    monkeypatch.setattr(MAETask, "_noise", global_noise)
    reseed_global_rngs(0)
    whole_run = pretrain(recipe(shards), run_dir=tmp_path / "whole")
    reseed_global_rngs(0)
    resumed = interrupted_then_resumed(shards, tmp_path / "split", STEPS_PER_EPOCH,
                                       between=lambda: reseed_global_rngs(1))
    assert records(tmp_path / "split") == records(tmp_path / "whole")
    a, b = weights(whole_run), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- --resume, parsed once; what may change on resume --------------------------------------


def test_resume_parses_words_and_existing_paths_once(tmp_path: Path) -> None:
    assert Resume.parse("auto") == Resume("auto")
    assert Resume.parse("never") == Resume("never")
    assert Resume.parse(tmp_path) == Resume("path", tmp_path)
    assert Resume("auto") == Resume.AUTO
    with pytest.raises(BadInputError, match=r"--resume .*nope: no such checkpoint"):
        Resume.parse(tmp_path / "nope")


def test_resume_never_into_an_empty_directory_starts_fresh(tmp_path: Path) -> None:
    assert find_resume(tmp_path / "new", Resume.parse("never")) is None
    assert find_resume(tmp_path / "new", Resume.AUTO) is None


def test_a_change_of_data_workers_is_not_safe_on_resume() -> None:
    """Each worker reads its own stream of the epoch: another count reads the samples in
    another order, so resuming with it would not repeat the run."""
    from cratemae.recipe import unsafe_changes

    base = load_recipe(REPO / "recipes" / "demo.toml", ["data.num_workers=2"])
    other = load_recipe(REPO / "recipes" / "demo.toml", ["data.num_workers=3"])
    assert unsafe_changes(base, other) == ["data.num_workers"]
    later = load_recipe(REPO / "recipes" / "demo.toml", ["data.num_workers=2",
                                                        "schedule.epochs=99"])
    assert unsafe_changes(base, later) == []
