"""One training loop for every task: pre-training, fine-tuning, MAE's linear probe.

A `Task` (`cratemae.train.task`) supplies the model, the loss of a batch and the data, and
declares its optional behaviour (its own optimizer groups, a weight average, evaluation,
monitoring); `RunSetup` (`cratemae.train.setup`) supplies the launch, the run directory and
the checkpoint to resume from. The `Trainer` is the loop: the step plan, one `TrainStep`
(`cratemae.train.step`) after another, checkpoints, exact resume and preemption. What the
run reports (metrics lines, loggers, evaluations and the best weights, monitoring) is the
`RunRecorder`'s (`cratemae.train.recorder`). Every decision that ends or saves the run (a
signal, a save, too many bad samples) is agreed by all ranks through one small all-reduce
per step, so no rank stops alone while the others wait. Too many non-finite losses roll the
run back to its last checkpoint, or stop it (`cratemae.train.recovery`): every rank decides
alike from the step's all-reduced verdict.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cratemae.checkpoints.layout import step_dir_name, step_of
from cratemae.checkpoints.resolve import check_checkpoint_dir
from cratemae.checkpoints.state_dict import first_nonfinite
from cratemae.distributed import dist
from cratemae.distributed.precision import Precision, resolve_precision
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.rundir import RunFiles
from cratemae.train.ema import WeightEMA, WithEMA
from cratemae.train.optim import configure_optimizers, lr_at
from cratemae.train.plan import plan_steps
from cratemae.train.recorder import RunRecorder
from cratemae.train.recovery import NanGuard, Rollback
from cratemae.train.setup import RunSetup
from cratemae.train.state import TrainState, restore_run, save_run
from cratemae.train.step import StepCounts, TrainStep
from cratemae.train.task import Task

__all__ = ["Preempted", "RunResult", "Trainer"]

log = logging.getLogger("cratemae")


class Preempted(CrateMAEError):
    """Stopped by a signal after saving a checkpoint: requeue the job to resume."""

    exit_code = EXIT_REQUEUE


@dataclass
class RunResult:
    run_dir: Path
    last_checkpoint: Path | None
    final_loss: float | None
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    main_process: bool = True  # rank 0: the one that reports
    evals: list[dict[str, Any]] = field(default_factory=list)  # with an `evaluate` hook
    best: dict[str, Any] | None = None  # the best evaluation (see `BestKeeper`)
    monitors: list[dict[str, Any]] = field(default_factory=list)  # with a `monitor` hook
    total_steps: int = 0
    finished_before: bool = False  # resumed at its last step: nothing was left to train

    @property
    def recovery_note(self) -> str:
        """`rolled back 2x, lr x0.25` (and `, float32`) when non-finite losses rolled the run
        back; '' otherwise: for the closing summary of every trainer-driven command."""
        s = self.state
        if not s.recoveries:
            return ""
        return (f"rolled back {s.recoveries}x, lr x{s.lr_factor:g}"
                + (", float32" if s.fp32 else ""))


class Trainer:
    def __init__(self, run: RunSetup, task: Task,
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.run, self.recipe, self.task, self.run_dir = run, run.recipe, task, run.run_dir
        self.device = run.info.device
        self.precision = resolve_precision(self.recipe.run.precision, self.device)
        self.model = task.model.to(self.device)
        self._plan_steps()
        optimizer = configure_optimizers(self.model, self.recipe.optim, self.peak,
                                         task.param_groups())
        self.ema = WeightEMA(self.model, task.ema_decay) if task.ema_decay else None
        o = self.recipe.optim
        self.stepper = TrainStep(
            task, optimizer=optimizer, precision=self.precision, accum=self.accum,
            lr=lambda step: lr_at(step, total=self.total_steps, warmup=self.warmup_steps,
                                  peak=self.peak, minimum=o.min_lr),
            clip_grad=o.clip_grad, ema=self.ema, compile=self.recipe.run.compile,
            device=self.device)
        # What checkpoints hold: the model, and its average when there is one.
        self.saved: Any = WithEMA(self.model, self.ema) if self.ema else self.model
        self.state = TrainState()
        resume = run.resume_from
        if resume is not None:
            self.state = restore_run(resume, model=self.saved, optimizer=optimizer,
                                     scaler=self.stepper.scaler, recipe=self.recipe)
            if self.state.fp32:
                self._use_fp32()
                log.info("training in fp32: a recovery from non-finite losses switched this "
                         "run to it (run.nan_recovery = \"rollback_fp32\")")
        resume_step = self.state.step if resume is not None else None
        self.recorder = RunRecorder(self.recipe, task, self.run_dir, resume_step=resume_step,
                                    total_steps=self.total_steps, ema=self.ema, on_log=on_log)
        self.last_checkpoint: Path | None = resume  # rank 0's saves (for messages)
        self.rollback_to: Path | None = resume  # every rank's: the last saved or resumed from
        self.last_saved_step = resume_step if resume_step is not None else -1
        self.nan_guard = NanGuard(self.recipe.run)

    def _plan_steps(self) -> None:
        r, world = self.recipe, self.run.info.world_size
        steps = plan_steps(r, self.task.batches_per_epoch(), world)  # what --dry-run shows
        self.accum, self.steps_per_epoch = steps.accum, steps.steps_per_epoch
        self.total_steps, self.warmup_steps = steps.total_steps, steps.warmup_steps
        self.peak = steps.peak_lr
        log.info("%s; %d steps (%d per epoch), %d warm-up", steps.lr_note, self.total_steps,
                 self.steps_per_epoch, self.warmup_steps)
        if self.total_steps < self.warmup_steps and dist.is_main_process():
            # A short trial run (`--set schedule.max_steps=...`) otherwise trains at a fraction
            # of the lr the recipe asks for, and nothing says so.
            log.warning(
                "the run is %d steps, shorter than its %d warm-up steps "
                "(schedule.warmup_epochs=%g): the learning rate never reaches its peak %.3g "
                "(lower schedule.warmup_epochs or raise schedule.max_steps / schedule.epochs)",
                self.total_steps, self.warmup_steps, r.schedule.warmup_epochs, self.peak)
        if self.precision.note:
            log.info(self.precision.note)

    # --- the loop --------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train to `total_steps`, then save; raise `Preempted` after saving on a signal."""
        with self.recorder:
            return self._fit()

    def _fit(self) -> RunResult:
        rec, state = self.recorder, self.state
        finished_before = state.step >= self.total_steps
        if finished_before and dist.is_main_process():
            log.info("the run in %s is already finished (step %d of %d): nothing to train",
                     self.run_dir, state.step, self.total_steps)
        # A run resumed at its end whose last evaluation is logged is not evaluated again
        # (agreed by all ranks: only rank 0 reads metrics.jsonl).
        last_eval = rec.last_eval
        evaluated = dist.all_reduce_any(
            finished_before and last_eval is not None and last_eval.get("step") == state.step)
        if evaluated:
            if last_eval is not None:
                rec.evals.append(last_eval)  # what the finished run reported
            rec.last_monitor_step = state.step
        rec.start_clock(state.step)
        self.model.train()
        history: list[dict[str, Any]] = []
        self._train(history)
        self._check_trained()  # raises: every step skipped, or weights that are not finite
        if rec.best is not None and not evaluated and not rec.evaluated_at(state.step):
            rec.evaluate(self.model, state)
        if self.task.monitor_every is not None and rec.last_monitor_step != state.step:
            rec.monitor(self.model, state)
        if self.last_saved_step != state.step:
            self._save(end_of_epoch=state.batch == 0)
        result = RunResult(self.run_dir, self.last_checkpoint, _final_loss(history, rec),
                           state, history, main_process=dist.is_main_process(),
                           evals=rec.evals,
                           best=rec.best.record if rec.best is not None else None,
                           monitors=rec.monitors, total_steps=self.total_steps,
                           finished_before=finished_before)
        if result.recovery_note and dist.is_main_process():
            log.info("non-finite losses rolled this run back: %s", result.recovery_note)
        return result

    def _train(self, history: list[dict[str, Any]]) -> None:
        """The steps, up to `total_steps`; raise `Preempted` after saving on a signal."""
        rec, state = self.recorder, self.state
        counts = StepCounts()
        last_save = time.monotonic()
        per_epoch = self.steps_per_epoch * self.accum  # micro-batches used per epoch
        self.steps_run = self.steps_ok = 0
        with PreemptionFlag() as preempt:
            while state.step < self.total_steps:
                loader = self.task.loader(epoch=state.epoch, start_batch=state.batch)
                batches = iter(loader)
                end_of_epoch = False
                while not end_of_epoch and state.step < self.total_steps:
                    ok = self.stepper.step(batches, state, counts)
                    self.steps_run, self.steps_ok = self.steps_run + 1, self.steps_ok + ok
                    if self.nan_guard.tripped(ok, state.step):
                        self._roll_back(counts, history)  # or raise: the run stops
                        break  # a new loader, at the checkpoint's data position
                    self._warn(self.nan_guard.report(state.step))
                    end_of_epoch = state.batch >= per_epoch
                    if end_of_epoch:
                        state.epoch, state.batch = state.epoch + 1, 0
                        if rec.eval_due(state):
                            rec.evaluate(self.model, state)
                    if rec.log_due(state):
                        history.append(rec.train_line(counts, state, self.device))
                    if rec.monitor_due(state):
                        rec.monitor(self.model, state)
                    minutes = (time.monotonic() - last_save) / 60
                    due = minutes >= self.recipe.run.checkpoint_every_minutes or (
                        self._save_due(end_of_epoch))
                    stop, save = self._agree(preempt.requested, due and self._good(ok),
                                             loader.bad_fraction_error(final=end_of_epoch))
                    if stop:
                        self._stop(end_of_epoch)  # raises Preempted
                    if save:
                        self._save(end_of_epoch)
                        last_save = time.monotonic()
        self._warn(self.nan_guard.report(state.step, final=True))

    # --- decisions and saving --------------------------------------------------------------
    def _save_due(self, end_of_epoch: bool) -> bool:
        run, state = self.recipe.run, self.state
        by_steps = run.checkpoint_every_steps and state.step % run.checkpoint_every_steps == 0
        by_epoch = (end_of_epoch and run.keep_every_epochs is not None
                    and state.epoch % run.keep_every_epochs == 0)
        return bool(by_steps or by_epoch)

    def _good(self, ok: bool) -> bool:
        """Whether a routine save may keep this moment (rank 0 decides): the step was not
        skipped and the weights are finite, so the newest checkpoint is always one a
        rollback can go back to (a finite loss whose update overflowed leaves NaN weights
        that only the next step's loss shows)."""
        if not ok or not dist.is_main_process():
            return ok
        bad = self._nonfinite()
        if bad is not None:
            log.warning("non-finite weights after step %d (%s): checkpoint not saved",
                        self.state.step, bad)
        return bad is None

    def _nonfinite(self) -> str | None:
        """The first tensor of what a checkpoint would hold (the weights, their average)
        that has NaN or inf, or None."""
        found = first_nonfinite(self.saved.state_dict())
        return None if found is None else found[0]

    def _finite_everywhere(self) -> bool:
        """Every rank's weights are finite (a collective: every rank must call)."""
        return not dist.all_reduce_any(self._nonfinite() is not None)

    def _stop(self, end_of_epoch: bool) -> None:
        """A stop signal: save (unless the weights are not finite: a requeued job must
        resume from a finite checkpoint), then raise `Preempted`."""
        if not self._finite_everywhere():
            where = self.rollback_to or "the start (no checkpoint yet)"
            raise Preempted(f"stopped by a signal at step {self.state.step}, whose weights "
                            f"are not finite (NaN/inf): not saved; rerun the same command "
                            f"to resume from {where}")
        self._save(end_of_epoch)
        saved = (self.last_checkpoint if dist.is_main_process() else
                 f"step {self.state.step} (rank 0 saved it)")
        raise Preempted(f"stopped by a signal after saving {saved}; rerun the same command "
                        f"to resume")

    def _check_trained(self) -> None:
        """Exit status 1, nothing saved, when this session's steps were all skipped for
        non-finite losses, or left weights that are not finite: never "finished"."""
        last = self.rollback_to or "none (no checkpoint saved yet)"
        if self.steps_run and not self.steps_ok:
            raise CrateMAEError(
                f"every one of the {self.steps_run} step(s) this run took was skipped: its "
                f"loss was never finite (NaN/inf), nothing was trained and nothing saved "
                f"(lower optim.base_lr, or check the data); last checkpoint: {last}")
        if self.steps_run and not self._finite_everywhere():
            raise CrateMAEError(
                f"the weights after step {self.state.step} are not finite (NaN/inf): not "
                f"saved; last finite checkpoint: {last}")

    def _warn(self, message: str | None) -> None:
        if message is not None and dist.is_main_process():
            log.warning(message)

    def _agree(self, stop: bool, save: bool,
               bad_data: Exception | None) -> tuple[bool, bool]:
        """Every rank takes rank 0's save decision and anyone's stop request; every rank
        raises if any rank's data is over `data.max_bad_fraction` bad."""
        flags = torch.tensor([float(stop), float(save and dist.is_main_process()),
                              float(bad_data is not None)], device=dist.comm_device())
        flags = dist.all_reduce_max(flags)
        if flags[2]:
            raise bad_data or BadInputError("data: another rank has too many bad samples")
        return bool(flags[0]), bool(flags[1])

    def _save(self, end_of_epoch: bool) -> None:
        path = save_run(self.run_dir, model=self.saved, config=self.task.config,
                        optimizer=self.stepper.optimizer, scaler=self.stepper.scaler,
                        state=self.state, recipe=self.recipe, end_of_epoch=end_of_epoch)
        self.last_checkpoint = path or self.last_checkpoint
        self.rollback_to = RunFiles(self.run_dir).checkpoints / step_dir_name(self.state.step)
        self.last_saved_step = self.state.step
        dist.barrier()

    # --- recovering from non-finite losses ---------------------------------------------------
    def _roll_back(self, counts: StepCounts, history: list[dict[str, Any]]) -> None:
        """Every rank reloads the last checkpoint (weights, optimizer, scaler, average, RNG
        states, data position) and goes on with a lower lr, maybe in float32; or the run
        stops (`NanGuard.decide`, the same on every rank)."""
        found = self.rollback_to
        if found is not None:
            try:
                check_checkpoint_dir(found, verify_hashes=False)
            except CrateMAEError:
                found = None
        # Every rank must see the checkpoint rank 0 saved, or none rolls back.
        missing = dist.all_reduce_any(found is None)
        loss, best = _losses(history, None if found is None else step_of(found.name))
        plan: Rollback = self.nan_guard.decide(self.state, None if missing else found,
                                               loss=loss, best=best)
        restored = restore_run(plan.checkpoint, model=self.saved,
                               optimizer=self.stepper.optimizer, scaler=self.stepper.scaler,
                               recipe=self.recipe, verb="rolled back to")
        restored.recoveries, restored.lr_factor = plan.number, plan.lr_factor
        restored.fp32 = plan.fp32
        self.state.replace_with(restored)
        if plan.fp32 and self.stepper.precision.name != "fp32":
            self._use_fp32()
        self.last_saved_step = self.state.step
        counts.reset()
        history[:] = [r for r in history if r["step"] <= self.state.step]
        self.recorder.rewind(self.state.step)
        if dist.is_main_process():
            max_recoveries = self.recipe.run.nan_max_recoveries
            log.warning(plan.warning(self.state.step, max_recoveries, self.run_dir))
            self.recorder.write(plan.record(self.state.step, self.stepper.precision.name,
                                            self.run_dir))

    def _use_fp32(self) -> None:
        self.precision = Precision("fp32", self.device.type, "")
        self.stepper.use_precision(self.precision)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _losses(history: list[dict[str, Any]], step: int | None
            ) -> tuple[float | None, float | None]:
    """The last logged loss at or before `step` (a checkpoint's), and the best logged loss
    of this session: what a rollback's message weighs."""
    losses = [(r["step"], r["loss"]) for r in history if _finite(r.get("loss"))]
    at = [loss for s, loss in losses if step is not None and s <= step]
    return (at[-1] if at else None), (min(loss for _, loss in losses) if losses else None)


def _final_loss(history: list[dict[str, Any]], rec: RunRecorder) -> float | None:
    """The run's last finite logged loss (a window of skipped steps logs NaN: never a
    result)."""
    for record in reversed(history):
        if _finite(record.get("loss")):
            return record["loss"]
    last = rec.last_loss()
    return last if _finite(last) else None
