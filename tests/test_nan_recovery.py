"""Runs that survive a NaN (`cratemae.train.recovery`): non-finite losses injected at chosen
micro-batches (by wrapping the task's loss, no recipe key) make the run roll back to its last
checkpoint with a lower learning rate, or in float32, or stop; a run without them is
untouched by the keys."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import DEMO_RECIPE, TINY, cli, tiny_recipe

from cratemae.checkpoints import load_checkpoint
from cratemae.checkpoints.resolve import MetaFieldError, check_meta_fields
from cratemae.distributed.precision import Precision
from cratemae.errors import BadInputError, CrateMAEError
from cratemae.recipe import load_recipe
from cratemae.recipe.schema import RunSection
from cratemae.tasks.pretrain import MAETask, pretrain
from cratemae.train import trainer as trainer_module
from cratemae.train.loggers import Loggers, scalars
from cratemae.train.recovery import NanGuard
from cratemae.train.runs import describe_run
from cratemae.train.state import TrainState

# 8 steps of the smallest model, a checkpoint every 2 steps, a line every step.
RUN = ["schedule.max_steps=8", "schedule.warmup_epochs=0.05", "run.log_every=1",
       "run.checkpoint_every_steps=2", "run.loggers=[]", "data.num_workers=0"]
# Two non-finite losses in a row roll back.
NAN = ["run.nan_patience=2"]
COMPARED = ("step", "epoch", "loss", "lr", "bad_samples")


def recipe(*sets: str):
    return tiny_recipe(*RUN, *sets)


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in lines(run_dir) if r.get("kind") == "train"]


def recoveries(run_dir: Path) -> list[dict]:
    return [r for r in lines(run_dir) if r.get("kind") == "recovery"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "step-000000008").model_state


def inject_nan(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool],
               once: bool = True) -> list[int]:
    """The task's loss is NaN at the micro-batches `bad` picks (each only the first time it
    is reached when `once`: a rollback then repeats it finite). Returns the NaN micros."""
    real, hit = MAETask.loss, []

    def loss(self, model, batch, micro):
        out = real(self, model, batch, micro)
        if bad(micro) and not (once and micro in hit):
            hit.append(micro)
            return out * float("nan")
        return out

    monkeypatch.setattr(MAETask, "loss", loss)
    return hit


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 8-step run without a NaN and without the new keys."""
    run_dir = tmp_path_factory.mktemp("clean")
    pretrain(recipe(), run_dir=run_dir)
    return run_dir


def test_the_guard_counts_in_a_row_or_in_a_window():
    in_a_row = NanGuard(RunSection(nan_patience=2))
    assert [in_a_row.tripped(ok) for ok in (False, True, False, False)] == [
        False, False, False, True]
    assert in_a_row.reason(9) == "2 non-finite losses in a row at step 9"
    window = NanGuard(RunSection(nan_patience=2, nan_window=3))
    assert [window.tripped(ok) for ok in (False, True, True, False, True, False)] == [
        False, False, False, False, False, True]
    assert window.reason(6) == "2 non-finite losses in the last 3 steps at step 6"


def test_the_guard_decides_rollback_stop_or_too_many(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-000000004"
    guard = NanGuard(RunSection(nan_patience=1, nan_max_recoveries=2, nan_lr_factor=0.5,
                                nan_recovery="rollback_fp32"))
    guard.tripped(False)
    plan = guard.decide(TrainState(step=6, recoveries=1, lr_factor=0.5), ckpt)
    assert (plan.number, plan.lr_factor, plan.fp32, plan.at_step) == (2, 0.25, True, 6)
    assert plan.warning(4, 2, tmp_path) == (
        "1 non-finite losses in a row at step 6; rolled back to step 4 "
        "(checkpoints/step-000000004), lr x0.25, float32 from now on, recovery 2 of 2")
    guard.tripped(False)
    with pytest.raises(CrateMAEError, match=r"after 2 rollback\(s\)"):
        guard.decide(TrainState(step=6, recoveries=2), ckpt)
    with pytest.raises(CrateMAEError, match="no checkpoint of this run to roll back to"):
        guard.decide(TrainState(step=6), None)
    stop = NanGuard(RunSection(nan_patience=1, nan_recovery="stop"))
    stop.tripped(False)
    with pytest.raises(CrateMAEError, match=r"last good checkpoint: .*step-000000004"):
        stop.decide(TrainState(step=6), ckpt)


def test_the_old_max_nonfinite_key_reads_as_patience_and_stop():
    run = load_recipe(DEMO_RECIPE, ["run.max_nonfinite=3"]).run
    assert (run.nan_patience, run.nan_recovery) == (3, "stop")
    assert load_recipe(DEMO_RECIPE).run.nan_recovery == "rollback"
    with pytest.raises(BadInputError, match="old name of nan_patience"):
        load_recipe(DEMO_RECIPE, ["run.max_nonfinite=3", "run.nan_patience=4"])
    with pytest.raises(BadInputError, match=r"nan_window .* at least nan_patience"):
        load_recipe(DEMO_RECIPE, ["run.nan_patience=4", "run.nan_window=3"])
    with pytest.raises(BadInputError, match="nan_recovery"):
        load_recipe(DEMO_RECIPE, ['run.nan_recovery="retry"'])


def test_the_base_recipe_shows_the_keys():
    shown = cli("recipes", "show", "base").output
    assert all(f"{key} = " in shown for key in ("nan_patience", "nan_recovery",
                                                 "nan_max_recoveries", "nan_lr_factor"))


def test_a_rollback_goes_back_to_the_last_checkpoint_with_half_the_lr(
        tmp_path, monkeypatch, caplog, clean):
    caplog.set_level(logging.INFO, logger="cratemae")
    hit = inject_nan(monkeypatch, lambda micro: micro in (4, 5))  # steps 5 and 6
    result = pretrain(recipe(*NAN), run_dir=tmp_path)
    assert hit == [4, 5] and result.state.step == 8
    [record] = recoveries(tmp_path)
    assert record == {"kind": "recovery", "step": 4, "rolled_back_to": 4, "at_step": 6,
                      "checkpoint": "checkpoints/step-000000004",
                      "reason": "2 non-finite losses in a row at step 6", "lr_factor": 0.5,
                      "precision": "fp32", "recovery": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "rolled back" in r.getMessage()]
    loss4 = f"{train_lines(clean)[3]['loss']:.4g}"  # the checkpoint's last loss
    assert warnings == ["2 non-finite losses in a row at step 6; rolled back to step 4 "
                        f"(checkpoints/step-000000004, loss {loss4}), lr x0.5, recovery 1 of 3"]
    # One line per step in order, the recovery line where the run went back to.
    assert [r["step"] for r in lines(tmp_path)] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    ran, ref = train_lines(tmp_path), train_lines(clean)
    assert [r["lr"] for r in ran[:4]] == [r["lr"] for r in ref[:4]]
    assert [r["lr"] for r in ran[4:]] == [0.5 * r["lr"] for r in ref[4:]]
    assert all(r["loss"] is not None for r in ran)
    final = load_checkpoint(tmp_path / "checkpoints" / "step-000000008")
    assert all(torch.isfinite(v).all() for v in final.model_state.values())
    assert (final.meta["lr_factor"], final.meta["recoveries"], final.meta["fp32"]) == (
        0.5, 1, False)
    assert describe_run(tmp_path).recoveries == 1


def test_a_rollback_at_the_same_lr_repeats_the_clean_run_exactly(tmp_path, monkeypatch,
                                                                   clean):
    """Everything is reloaded (weights, optimizer, RNG states, data position): going on
    from the checkpoint at lr x1 is the run that never met the NaN."""
    inject_nan(monkeypatch, lambda micro: micro in (4, 5))
    pretrain(recipe(*NAN, "run.nan_lr_factor=1.0"), run_dir=tmp_path)
    assert len(recoveries(tmp_path)) == 1
    keep = lambda rs: [{k: r[k] for k in COMPARED} for r in rs]  # noqa: E731
    assert keep(train_lines(tmp_path)) == keep(train_lines(clean))
    ran, ref = final_weights(tmp_path), final_weights(clean)
    assert all(torch.equal(ran[k], ref[k]) for k in ref)


def test_a_rollback_puts_the_weight_average_back_too(tmp_path, monkeypatch):
    """Pre-training with an average of the weights (fine-tuning's `finetune.ema`): after
    a rollback at lr x1 it, too, is the clean run's."""
    monkeypatch.setattr(MAETask, "ema_decay", 0.5)
    pretrain(recipe(), run_dir=tmp_path / "clean")
    inject_nan(monkeypatch, lambda micro: micro in (4, 5))
    pretrain(recipe(*NAN, "run.nan_lr_factor=1.0"), run_dir=tmp_path / "rolled")
    assert len(recoveries(tmp_path / "rolled")) == 1
    ran, ref = final_weights(tmp_path / "rolled"), final_weights(tmp_path / "clean")
    assert any(k.startswith("ema.") for k in ref)
    assert all(torch.equal(ran[k], ref[k]) for k in ref)


def test_non_finite_weights_are_never_saved_so_the_rollback_goes_further_back(
        tmp_path, monkeypatch, caplog):
    """A finite loss whose update overflows leaves NaN weights: the checkpoint due after
    it is not saved, the next losses are NaN, and the run goes back to the one before."""
    caplog.set_level(logging.WARNING, logger="cratemae")
    real, done = MAETask.loss, []

    def loss(self, model, batch, micro):
        out = real(self, model, batch, micro)
        if micro == 5 and not done:  # step 6: its loss is finite, its update is not
            done.append(micro)
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(MAETask, "loss", loss)
    pretrain(recipe(*NAN), run_dir=tmp_path)
    assert re.search(r"non-finite weights after step 6 \(\S+\): checkpoint not saved",
                     caplog.text)
    [record] = recoveries(tmp_path)
    assert (record["at_step"], record["rolled_back_to"]) == (8, 4)
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path).values())


def test_a_run_without_nan_is_bit_identical_with_the_keys_set(tmp_path, clean):
    pretrain(recipe("run.nan_patience=3", "run.nan_window=10",
                    'run.nan_recovery="rollback_fp32"', "run.nan_max_recoveries=5",
                    "run.nan_lr_factor=0.25"), run_dir=tmp_path)
    assert recoveries(tmp_path) == []
    ran, ref = final_weights(tmp_path), final_weights(clean)
    assert all(torch.equal(ran[k], ref[k]) for k in ref)


def test_rollback_fp32_trains_in_float32_after_and_a_resume_keeps_it(tmp_path, monkeypatch,
                                                                      clean):
    # bf16 autocast on the CPU, so that the switch to float32 is one.
    precisions: list[str] = []
    monkeypatch.setattr(trainer_module, "resolve_precision",
                        lambda requested, device: Precision("bf16", device.type, ""))
    real_step = trainer_module.TrainStep.step

    def step(self, batches, state, counts=None):
        precisions.append(self.precision.name)
        return real_step(self, batches, state, counts)

    monkeypatch.setattr(trainer_module.TrainStep, "step", step)
    inject_nan(monkeypatch, lambda micro: micro in (4, 5))
    pretrain(recipe(*NAN, 'run.nan_recovery="rollback_fp32"'), run_dir=tmp_path)
    [record] = recoveries(tmp_path)
    assert (record["precision"], record["lr_factor"]) == ("fp32", 0.5)
    # steps 1-6 in bf16 (5 and 6 skipped), then 5-8 again in float32
    assert precisions == ["bf16"] * 6 + ["fp32"] * 4
    assert load_checkpoint(tmp_path / "checkpoints" / "step-000000008").meta["fp32"] is True
    # A resume (two more steps) continues in float32 at half the lr, recovery line kept.
    precisions.clear()
    pretrain(recipe(*NAN, 'run.nan_recovery="rollback_fp32"', "schedule.max_steps=10"),
             run_dir=tmp_path)
    assert precisions == ["fp32"] * 2
    assert len(recoveries(tmp_path)) == 1
    resumed = load_checkpoint(tmp_path / "checkpoints" / "step-000000010").meta
    assert (resumed["fp32"], resumed["lr_factor"], resumed["recoveries"]) == (True, 0.5, 1)


def test_the_run_stops_after_nan_max_recoveries(tmp_path, monkeypatch):
    hit = inject_nan(monkeypatch, lambda micro: micro >= 4, once=False)  # diverged for good
    run = cli("pretrain", DEMO_RECIPE, *[f"--set={s}" for s in [*TINY, *RUN, *NAN]],
              "--set=run.nan_max_recoveries=2", "--out", tmp_path)
    assert run.exit_code == 1, run.output
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    loss4 = f"{train_lines(tmp_path)[3]['loss']:.4g}"
    assert errors == [
        "error: 2 non-finite losses in a row at step 6, after 2 rollback(s) "
        f"(run.nan_max_recoveries = 2): the run keeps diverging; last good checkpoint: "
        f"{tmp_path / 'checkpoints' / 'step-000000004'} (loss {loss4})"]
    assert [(r["recovery"], r["lr_factor"]) for r in recoveries(tmp_path)] == [
        (1, 0.5), (2, 0.25)]
    assert hit == [4, 5] * 3


def test_stop_mode_stops_at_the_threshold_naming_the_last_good_checkpoint(tmp_path,
                                                                          monkeypatch):
    inject_nan(monkeypatch, lambda micro: micro in (4, 5))
    run = cli("pretrain", DEMO_RECIPE, *[f"--set={s}" for s in [*TINY, *RUN, *NAN]],
              '--set=run.nan_recovery="stop"', "--out", tmp_path)
    assert run.exit_code == 1, run.output
    loss4 = f"{train_lines(tmp_path)[3]['loss']:.4g}"
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
        'error: 2 non-finite losses in a row at step 6 (run.nan_recovery = "stop"); last '
        f"good checkpoint: {tmp_path / 'checkpoints' / 'step-000000004'} (loss {loss4})"]
    assert recoveries(tmp_path) == []


def test_no_checkpoint_to_roll_back_to_stops_the_run(tmp_path, monkeypatch):
    inject_nan(monkeypatch, lambda micro: micro in (0, 1))
    with pytest.raises(CrateMAEError, match="no checkpoint of this run to roll back to") as err:
        pretrain(recipe(*NAN), run_dir=tmp_path)
    assert err.value.exit_code == 1


def test_recovery_lines_make_their_own_curves():
    record = {"kind": "recovery", "step": 4, "rolled_back_to": 4, "at_step": 6,
              "checkpoint": "checkpoints/step-000000004", "reason": "x", "lr_factor": 0.5,
              "precision": "fp32", "recovery": 1}
    assert scalars(record) == {"recovery/lr_factor": 0.5, "recovery/number": 1.0}
    assert scalars({"kind": "something new", "step": 1, "x": 2.0}) == {}


def test_tensorboard_forgets_the_steps_after_a_rollback(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = Loggers(tmp_path, ["tensorboard"], resume_step=None, config={})
    for step in range(1, 7):
        loggers.write({"kind": "train", "step": step, "loss": float(step)})
    loggers.rewind(4)
    loggers.write({"kind": "recovery", "step": 4, "lr_factor": 0.5, "recovery": 1})
    loggers.write({"kind": "train", "step": 5, "loss": 50.0})
    loggers.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert [e.step for e in acc.Scalars("recovery/lr_factor")] == [4]


def test_a_hand_edited_recovery_field_is_refused(tmp_path):
    meta = {"step": 4, "epoch": 0, "world_size": 1, "wall_time": 0.0,
            "data_position": {"epoch": 0, "batch": 4}}
    check_meta_fields({**meta, "lr_factor": 0.5, "fp32": True, "recoveries": 1}, tmp_path)
    for bad in ({"lr_factor": 0}, {"lr_factor": 2.0}, {"fp32": "yes"}, {"recoveries": -1}):
        with pytest.raises(MetaFieldError, match=next(iter(bad))):
            check_meta_fields({**meta, **bad}, tmp_path)
