"""One training loop for every task: pre-training, fine-tuning, MAE's linear probe.

A `Task` (`cratemae.train.task`) supplies the model, the loss of a batch and the data, and
declares its optional behaviour (its own optimizer groups, a weight average, evaluation); the
`Trainer` does the rest: devices and DDP, precision, the optimizer and its schedule, gradient
accumulation, non-finite steps, logging, checkpoints, exact resume and preemption. Every
decision that ends or saves the run (a signal, a save, too many bad samples) is agreed by all
ranks through one small all-reduce per step, so no rank stops alone while the others wait.
A task that evaluates is evaluated at the epochs it names and once at the end of training,
the average too when there is one, each logged to metrics.jsonl; the best weights are kept
in `RUN_DIR/best/` (see `cratemae.train.best`). A task that monitors (pre-training's
validation) is watched every `monitor_every` steps and at the end, on rank 0 while the other
ranks wait. Every metrics line also goes to the recipe's loggers (`cratemae.train.loggers`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cratemae.distributed import dist
from cratemae.distributed.precision import resolve_precision
from cratemae.distributed.preemption import PreemptionFlag
from cratemae.errors import EXIT_REQUEUE, BadInputError, CrateMAEError
from cratemae.recipe import Recipe
from cratemae.train.best import BestKeeper
from cratemae.train.ema import WeightEMA, WithEMA
from cratemae.train.loggers import Loggers
from cratemae.train.optim import configure_optimizers, lr_at, peak_lr
from cratemae.train.run_dir import MetricsLog, max_memory_gb, write_status
from cratemae.train.state import TrainState, restore_run, save_run
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


class Trainer:
    def __init__(self, recipe: Recipe, task: Task, run_dir: Path, resume: str | Path | None,
                 on_log: Callable[[dict[str, Any]], None] | None = None,
                 device: torch.device | None = None) -> None:
        self.recipe, self.task, self.run_dir = recipe, task, run_dir
        self.on_log = on_log or (lambda record: None)
        self.info = dist.get_dist_info()
        self.device = device or self.info.device
        self.precision = resolve_precision(recipe.run.precision, self.device)
        self.model = task.model.to(self.device)
        self._plan_steps()
        self.optimizer = self._build_optimizer()
        self.scaler = self.precision.make_scaler()
        self.ema = WeightEMA(self.model, task.ema_decay) if task.ema_decay else None
        # What checkpoints hold: the model, and its average when there is one.
        self.saved: Any = WithEMA(self.model, self.ema) if self.ema else self.model
        self.state = TrainState()
        if resume is not None:
            self.state = restore_run(Path(resume), model=self.saved, optimizer=self.optimizer,
                                     scaler=self.scaler, recipe=recipe)
        self.best = (BestKeeper(run_dir, task.config,
                                self.state.step if resume is not None else None)
                     if task.evaluates else None)
        self.evals: list[dict[str, Any]] = []
        self.forward_model = self._wrap(self.model)
        self.last_checkpoint: Path | None = Path(resume) if resume is not None else None
        self.last_saved_step = self.state.step if resume is not None else -1
        # Rank 0 only; lines logged after the checkpoint by an interrupted run are dropped.
        self.resume_step = self.state.step if resume is not None else None
        self.metrics = (MetricsLog(run_dir / "metrics.jsonl", self.resume_step)
                        if dist.is_main_process() else None)
        self.loggers: Loggers | None = None  # opened by `fit` (rank 0)
        self.monitors: list[dict[str, Any]] = []
        self.last_monitor_step = -1
        self._clock = (time.monotonic(), self.state.step)  # for the ETA: (time, step)

    # --- setup -----------------------------------------------------------------------------
    def _plan_steps(self) -> None:
        r = self.recipe
        batches = len(self.task.loader(epoch=0, start_batch=0))
        self.accum = r.optim.accum_steps
        self.steps_per_epoch = batches // self.accum
        if self.steps_per_epoch == 0:
            raise BadInputError(
                f"data.train: {batches} batch(es) per rank per epoch, fewer than "
                f"optim.accum_steps={self.accum}: use a smaller data.batch_size or more data")
        self.total_steps = r.schedule.epochs * self.steps_per_epoch
        if r.schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, r.schedule.max_steps)
        self.warmup_steps = round(r.schedule.warmup_epochs * self.steps_per_epoch)
        self.effective_batch = r.data.batch_size * self.accum * self.info.world_size
        self.peak, lr_note = peak_lr(r.optim, self.effective_batch)
        log.info("%s; %d steps (%d per epoch), %d warm-up", lr_note, self.total_steps,
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

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return configure_optimizers(self.model, self.recipe.optim, self.peak,
                                    self.task.param_groups())

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.recipe.run.compile:
            model = torch.compile(model)
        return model

    # --- the loop --------------------------------------------------------------------------
    def fit(self) -> RunResult:
        """Train to `total_steps`, then save; raise `Preempted` after saving on a signal."""
        main = dist.is_main_process()
        if main:
            self.loggers = Loggers(self.run_dir, self.recipe.run.loggers,
                                   resume_step=self.resume_step,
                                   config=self.recipe.model_dump(mode="json"))
            write_status(self.run_dir, "running", step=self.state.step,
                         total_steps=self.total_steps)
        try:
            result = self._fit()
        except (Preempted, KeyboardInterrupt):
            if main:
                write_status(self.run_dir, "stopped", step=self.state.step)
            raise
        except Exception as err:
            if main:
                write_status(self.run_dir, "failed", step=self.state.step,
                             error=f"{type(err).__name__}: {err}"[:1000])
            raise
        finally:
            if self.loggers is not None:
                self.loggers.close()
        if main:
            write_status(self.run_dir, "finished", step=self.state.step)
        return result

    def _fit(self) -> RunResult:
        finished_before = self.state.step >= self.total_steps
        if finished_before and dist.is_main_process():
            log.info("the run in %s is already finished (step %d of %d): nothing to train",
                     self.run_dir, self.state.step, self.total_steps)
        # A run resumed at its end whose last evaluation is logged is not evaluated again
        # (agreed by all ranks: only rank 0 reads metrics.jsonl).
        last_eval = self.metrics.last_eval if self.metrics is not None else None
        evaluated = dist.all_reduce_any(
            finished_before and last_eval is not None and last_eval.get("step") == self.state.step)
        if evaluated:
            if last_eval is not None:
                self.evals.append(last_eval)  # what the finished run reported
            self.last_monitor_step = self.state.step
        self._clock = (time.monotonic(), self.state.step)
        self.model.train()
        history: list[dict[str, Any]] = []
        window, consecutive_bad = _Window(), 0
        last_save = time.monotonic()
        per_epoch = self.steps_per_epoch * self.accum  # micro-batches used per epoch
        with PreemptionFlag() as preempt:
            while self.state.step < self.total_steps:
                self.current_loader = self.task.loader(epoch=self.state.epoch,
                                                       start_batch=self.state.batch)
                batches = iter(self.current_loader)
                end_of_epoch = False
                while not end_of_epoch and self.state.step < self.total_steps:
                    ok = self.train_step(batches, window)
                    consecutive_bad = 0 if ok else consecutive_bad + 1
                    if consecutive_bad >= self.recipe.run.max_nonfinite:
                        raise CrateMAEError(
                            f"{consecutive_bad} non-finite losses in a row at step "
                            f"{self.state.step}; last good checkpoint: {self.last_checkpoint}")
                    end_of_epoch = self.state.batch >= per_epoch
                    if end_of_epoch:
                        self.state.epoch, self.state.batch = self.state.epoch + 1, 0
                        if self._eval_due():
                            self._evaluate()
                    if self._log_due():
                        history.append(self._log(window))
                    if self._monitor_due():
                        self._monitor()
                    minutes = (time.monotonic() - last_save) / 60
                    # No routine save inside a run of skipped steps: the newest checkpoint
                    # stays one taken after a good step.
                    stop, save = self._agree(
                        preempt.requested,
                        consecutive_bad == 0 and (
                            minutes >= self.recipe.run.checkpoint_every_minutes
                            or self._save_due(end_of_epoch)),
                        self.current_loader.bad_fraction_error(final=end_of_epoch))
                    if save or stop:
                        self._save(end_of_epoch)
                        last_save = time.monotonic()
                    if stop:
                        saved = (self.last_checkpoint if dist.is_main_process() else
                                 f"step {self.state.step} (rank 0 saved it)")
                        raise Preempted(f"stopped by a signal after saving {saved}; rerun "
                                        f"the same command to resume")
        if self.best is not None and not evaluated and not (
                self.evals and self.evals[-1]["step"] == self.state.step):
            self._evaluate()
        if self.task.monitor_every is not None and self.last_monitor_step != self.state.step:
            self._monitor()
        if self.last_saved_step != self.state.step:
            self._save(end_of_epoch=self.state.batch == 0)
        final = history[-1]["loss"] if history else self._last_loss()
        return RunResult(self.run_dir, self.last_checkpoint, final, self.state, history,
                         main_process=dist.is_main_process(), evals=self.evals,
                         best=self.best.record if self.best is not None else None,
                         monitors=self.monitors, total_steps=self.total_steps,
                         finished_before=finished_before)

    def _last_loss(self) -> float | None:
        """The newest logged training loss of this run (a run resumed at its end logs none)."""
        last = self.metrics.last_train if self.metrics is not None else None
        return last.get("loss") if last else None

    def train_step(self, batches: Iterator[Any], window: _Window | None = None) -> bool:
        """One optimizer step over `accum` micro-batches of `batches`, counted in `window`.
        False if it was skipped because some rank's loss was not finite (then no rank runs
        backward). `cratemae bench` times this very step."""
        window = window if window is not None else _Window()
        lr = lr_at(self.state.step, total=self.total_steps, warmup=self.warmup_steps,
                   peak=self.peak, minimum=self.recipe.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        start, finite, losses = time.perf_counter(), True, []
        for i in range(self.accum):
            wait = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - wait
            self.state.batch += 1
            window.bad += batch.bad
            window.images += batch.images.shape[0]
            if not finite:
                continue  # keep the data position in step with every other rank
            last = i == self.accum - 1
            sync = contextlib.nullcontext() if last or self.info.world_size == 1 else (
                self.forward_model.no_sync())
            # DDP's own collectives (buffers in forward, gradients in backward) included.
            with sync, dist.collective("a training step's gradient exchange"):
                with self.precision.autocast():
                    loss = self.task.loss(self.forward_model, batch,
                                          self.state.step * self.accum + i)
                finite = not dist.all_reduce_any(not bool(torch.isfinite(loss.detach())))
                if finite:
                    self.scaler.scale(loss / self.accum).backward()
                    losses.append(loss.detach().float())
        if finite:
            self._optimizer_step()
            window.losses.append(torch.stack(losses).mean())
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_skipped += 1
            log.warning("non-finite loss at step %d: step skipped", self.state.step)
        window.lr, window.steps = lr, window.steps + 1
        window.seconds += time.perf_counter() - start
        self.state.step += 1
        return finite

    def _optimizer_step(self) -> None:
        clip = self.recipe.optim.clip_grad
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    # --- decisions, logging, saving --------------------------------------------------------
    def _log_due(self) -> bool:
        return (self.state.step % self.recipe.run.log_every == 0
                or self.state.step == self.total_steps)

    def _save_due(self, end_of_epoch: bool) -> bool:
        run = self.recipe.run
        by_steps = run.checkpoint_every_steps and self.state.step % run.checkpoint_every_steps == 0
        by_epoch = (end_of_epoch and run.keep_every_epochs is not None
                    and self.state.epoch % run.keep_every_epochs == 0)
        return bool(by_steps or by_epoch)

    def _monitor_due(self) -> bool:
        every = self.task.monitor_every
        return every is not None and self.state.step % every == 0

    def _monitor(self) -> None:
        """Rank 0 runs the task's `monitor` on the bare model while the other ranks wait;
        an error there stops every rank (none is left waiting in a collective)."""
        self.last_monitor_step = self.state.step
        error: Exception | None = None
        if dist.is_main_process():
            try:
                self._monitor_main()
            except Exception as err:  # raised again below, on every rank
                error = err
        dist.raise_together(error, "monitoring failed on rank 0 (see its log)")

    def _monitor_main(self) -> None:
        start = time.perf_counter()
        self.model.eval()
        try:
            with torch.no_grad():
                result = self.task.monitor(self.model, self.state.step, self.run_dir)
        finally:
            self.model.train()
        if result is None:
            return
        record: dict[str, Any] = {"kind": "eval", "step": self.state.step,
                                  "epoch": self.state.epoch, **result,
                                  "eval_seconds": time.perf_counter() - start}
        self.monitors.append(record)
        self._write(record)
        shown = " ".join(f"{k} {v:.4g}" for k, v in result.items()
                         if isinstance(v, float | int) and not isinstance(v, bool))
        log.info("eval at step %d: %s (%.1f s)", self.state.step, shown, record["eval_seconds"])

    def _write(self, record: dict[str, Any]) -> None:
        """One metrics line, to metrics.jsonl and the loggers (rank 0)."""
        if self.metrics is not None:
            self.metrics.write(record)
        if self.loggers is not None:
            self.loggers.write(record)

    def _eval_due(self) -> bool:
        every = self.task.eval_every
        return self.best is not None and every is not None and self.state.epoch % every == 0

    def _evaluate(self) -> None:
        """Evaluate the model (and its average) on every rank; log; keep the best."""
        record: dict[str, Any] = {"kind": "eval", "step": self.state.step,
                                  "epoch": self.state.epoch}
        candidates = {"": self.model}
        record.update(self.task.evaluate(self.model))
        if self.ema is not None:
            candidates["ema_"] = self.ema.module
            scores = self.task.evaluate(self.ema.module)
            record.update({f"ema_{k}": v for k, v in scores.items()})
        assert self.best is not None
        record["best"] = self.best.offer(record, candidates)
        self.evals.append(record)
        if self.metrics is None:
            return  # rank 0 reports
        self._write(record)
        ema = (f", average top-1 {record['ema_top1']:.2f}%" if self.ema is not None else "")
        log.info("eval at step %d (%d epochs done): top-1 %.2f%% top-5 %.2f%%%s",
                 record["step"], record["epoch"], record["top1"], record["top5"], ema)

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
                        optimizer=self.optimizer, scaler=self.scaler, state=self.state,
                        recipe=self.recipe, end_of_epoch=end_of_epoch)
        self.last_checkpoint = path or self.last_checkpoint
        self.last_saved_step = self.state.step
        dist.barrier()

    def _log(self, window: _Window) -> dict[str, Any]:
        """Reduce the window over ranks, write a metrics line (rank 0), start a new window."""
        loss = torch.stack(window.losses).mean() if window.losses else torch.tensor(math.nan)
        totals = torch.tensor([float(loss), float(window.images), float(window.bad)],
                              dtype=torch.float64, device=dist.comm_device())
        totals = dist.all_reduce_sum(totals)
        world = self.info.world_size
        self.state.bad_samples += int(totals[2])
        self.state.samples_seen += int(totals[1])
        elapsed, eta = self._elapsed_eta()
        record = {
            "kind": "train",
            "step": self.state.step,
            "epoch": self.state.epoch,
            "loss": float(totals[0]) / world,
            "lr": window.lr,
            "images_per_s": float(totals[1]) / max(window.seconds, 1e-9),
            "data_wait_fraction": window.wait / max(window.seconds, 1e-9),
            "max_memory_gb": max_memory_gb(self.device),
            "bad_samples": self.state.bad_samples,
            "nonfinite_skipped": self.state.nonfinite_skipped,
            "total_steps": self.total_steps,
            "elapsed_s": elapsed,
            "eta_s": eta,
        }
        if self.metrics is not None:
            self._write(record)
            log.info("step %d/%d epoch %d loss %.4f lr %.3g %.0f img/s data wait %.0f%% "
                     "mem %.2f GB bad %d elapsed %s eta %s", record["step"], self.total_steps,
                     record["epoch"], record["loss"], record["lr"], record["images_per_s"],
                     100 * record["data_wait_fraction"], record["max_memory_gb"],
                     record["bad_samples"], _hms(elapsed), _hms(eta), extra={"metrics": True})
            self.on_log(record)
        window.reset()
        return record


    def _elapsed_eta(self) -> tuple[float, float]:
        """Seconds since `fit` began, and the time left at this session's pace (evaluations
        and saves included)."""
        start, start_step = self._clock
        elapsed = time.monotonic() - start
        done = self.state.step - start_step
        eta = elapsed * (self.total_steps - self.state.step) / done if done > 0 else math.nan
        return elapsed, eta


def _hms(seconds: float) -> str:
    """4:05:09 (hours:minutes:seconds), or ? when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class _Window:
    """What happened since the last log line (this rank)."""

    losses: list[torch.Tensor] = field(default_factory=list)
    images: int = 0
    bad: int = 0
    steps: int = 0
    wait: float = 0.0
    seconds: float = 0.0
    lr: float = 0.0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]
