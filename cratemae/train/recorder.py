"""What a run reports besides its weights, kept beside the loop: the metrics lines (to
metrics.jsonl and the recipe's loggers, rank 0), the progress line with its ETA, the
evaluations of a task that evaluates (with the best weights, `cratemae.train.best`) and the
monitoring of a task that monitors (pre-training's validation, rank 0 while the others wait).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cratemae.data.plan import workers_needed
from cratemae.distributed import dist
from cratemae.recipe import Recipe
from cratemae.rundir import RunFiles
from cratemae.train.best import BestKeeper
from cratemae.train.ema import WeightEMA
from cratemae.train.loggers import Loggers
from cratemae.train.run_dir import MetricsLog, max_memory_gb
from cratemae.train.state import TrainState
from cratemae.train.step import StepCounts
from cratemae.train.task import Task

__all__ = ["RunRecorder"]

log = logging.getLogger("cratemae")


class RunRecorder:
    """The reports of one run in `run_dir`. `resume_step`: the step of the checkpoint the run
    resumed from (metrics lines logged after it by an interrupted run are dropped), or None.
    Use as a context manager around the loop: it opens and closes the loggers."""

    def __init__(self, recipe: Recipe, task: Task, run_dir: Path, *, resume_step: int | None,
                 total_steps: int, ema: WeightEMA | None,
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.recipe, self.task, self.run_dir = recipe, task, run_dir
        self.total_steps, self.ema, self.resume_step = total_steps, ema, resume_step
        self.on_log = on_log or (lambda record: None)
        self.main = dist.is_main_process()
        self.metrics = (MetricsLog(RunFiles(run_dir).metrics, resume_step)
                        if self.main else None)
        self.loggers: Loggers | None = None
        self.best = BestKeeper(run_dir, task.config, resume_step) if task.evaluates else None
        self.evals: list[dict[str, Any]] = []
        self.monitors: list[dict[str, Any]] = []
        self.last_monitor_step = -1
        self._clock = (time.monotonic(), 0)  # for the ETA: (time, step)

    def __enter__(self) -> RunRecorder:
        if self.main:
            self.loggers = Loggers(self.run_dir, self.recipe.run.loggers,
                                   resume_step=self.resume_step,
                                   config=self.recipe.model_dump(mode="json"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loggers is not None:
            self.loggers.close()

    def start_clock(self, step: int) -> None:
        self._clock = (time.monotonic(), step)

    @property
    def last_eval(self) -> dict[str, Any] | None:
        """The newest evaluation line of metrics.jsonl (rank 0; None elsewhere)."""
        return self.metrics.last_eval if self.metrics is not None else None

    def last_loss(self) -> float | None:
        """The newest logged training loss of this run (a run resumed at its end logs none)."""
        last = self.metrics.last_train if self.metrics is not None else None
        return last.get("loss") if last else None

    def write(self, record: dict[str, Any]) -> None:
        """One metrics line, to metrics.jsonl and the loggers (rank 0)."""
        if self.metrics is not None:
            self.metrics.write(record)
        if self.loggers is not None:
            self.loggers.write(record)

    def rewind(self, step: int) -> None:
        """After a rollback to the checkpoint of `step`: forget what was reported after it,
        as a resume from it would (metrics.jsonl's lines, TensorBoard's events, the best
        evaluation), so the reports read as one run that went on from there."""
        self.resume_step = step
        if self.main:
            self.metrics = MetricsLog(RunFiles(self.run_dir).metrics, step)
        if self.loggers is not None:
            self.loggers.rewind(step)
        if self.best is not None:
            self.best = BestKeeper(self.run_dir, self.task.config, step)
        self.evals = [r for r in self.evals if r["step"] <= step]
        self.monitors = [r for r in self.monitors if r["step"] <= step]
        self.last_monitor_step = min(self.last_monitor_step, step)
        self.start_clock(step)

    # --- training lines ---------------------------------------------------------------------
    def log_due(self, state: TrainState) -> bool:
        return state.step % self.recipe.run.log_every == 0 or state.step == self.total_steps

    def train_line(self, counts: StepCounts, state: TrainState,
                   device: torch.device) -> dict[str, Any]:
        """Reduce `counts` over ranks into one metrics line (written by rank 0), then reset
        them; the run's sample and bad-sample totals in `state` advance."""
        loss = torch.stack(counts.losses).mean() if counts.losses else torch.tensor(math.nan)
        totals = torch.tensor([float(loss), float(counts.images), float(counts.bad)],
                              dtype=torch.float64, device=dist.comm_device())
        totals = dist.all_reduce_sum(totals)
        world = dist.get_dist_info().world_size
        state.bad_samples += int(totals[2])
        state.samples_seen += int(totals[1])
        elapsed, eta = self._elapsed_eta(state.step)
        record = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": float(totals[0]) / world,
            "lr": counts.lr,
            "images_per_s": float(totals[1]) / max(counts.seconds, 1e-9),
            "data_wait_fraction": counts.wait / max(counts.seconds, 1e-9),
            "max_memory_gb": max_memory_gb(device),
            "bad_samples": state.bad_samples,
            "nonfinite_skipped": state.nonfinite_skipped,
            "total_steps": self.total_steps,
            "elapsed_s": elapsed,
            "eta_s": eta,
        }
        if self.main:
            self.write(record)
            log.info("step %d/%d epoch %d loss %.4f lr %.3g %.0f img/s data wait %.0f%%%s "
                     "mem %.2f GB bad %d elapsed %s eta %s", record["step"], self.total_steps,
                     record["epoch"], record["loss"], record["lr"], record["images_per_s"],
                     100 * record["data_wait_fraction"],
                     data_wait_hint(record["data_wait_fraction"], self.recipe.data.num_workers,
                                    gpu_decode=self.recipe.data.decode == "gpu"),
                     record["max_memory_gb"],
                     record["bad_samples"], _hms(elapsed), _hms(eta), extra={"metrics": True})
            self.on_log(record)
        counts.reset()
        return record

    def _elapsed_eta(self, step: int) -> tuple[float, float]:
        """Seconds since the loop began, and the time left at this session's pace
        (evaluations and saves included)."""
        start, start_step = self._clock
        elapsed = time.monotonic() - start
        done = step - start_step
        eta = elapsed * (self.total_steps - step) / done if done > 0 else math.nan
        return elapsed, eta

    # --- evaluation (every rank) ------------------------------------------------------------
    def eval_due(self, state: TrainState) -> bool:
        every = self.task.eval_every
        return self.best is not None and every is not None and state.epoch % every == 0

    def evaluated_at(self, step: int) -> bool:
        return bool(self.evals) and self.evals[-1]["step"] == step

    def evaluate(self, model: nn.Module, state: TrainState) -> None:
        """Evaluate the model (and its average) on every rank; log; keep the best."""
        record: dict[str, Any] = {"kind": "eval", "step": state.step, "epoch": state.epoch}
        candidates = {"": model}
        record.update(self.task.evaluate(model))
        if self.ema is not None:
            candidates["ema_"] = self.ema.module
            scores = self.task.evaluate(self.ema.module)
            record.update({f"ema_{k}": v for k, v in scores.items()})
        assert self.best is not None
        record["best"] = self.best.offer(record, candidates)
        self.evals.append(record)
        if not self.main:
            return  # rank 0 reports
        self.write(record)
        ema = (f", average top-1 {record['ema_top1']:.2f}%" if self.ema is not None else "")
        epochs = "1 epoch" if record["epoch"] == 1 else f"{record['epoch']} epochs"
        top5 = f" top-5 {record['top5']:.2f}%" if record.get("top5") is not None else ""
        log.info("eval at step %d (%s done): top-1 %.2f%%%s%s",
                 record["step"], epochs, record["top1"], top5, ema)

    # --- monitoring (rank 0, the others wait) -----------------------------------------------
    def monitor_due(self, state: TrainState) -> bool:
        every = self.task.monitor_every
        return every is not None and state.step % every == 0

    def monitor(self, model: nn.Module, state: TrainState) -> None:
        """Rank 0 runs the task's `monitor` on the bare model while the other ranks wait;
        an error there stops every rank (none is left waiting in a collective)."""
        self.last_monitor_step = state.step
        error: Exception | None = None
        if self.main:
            try:
                self._monitor_main(model, state)
            except Exception as err:  # raised again below, on every rank
                error = err
        dist.raise_together(error, "monitoring failed on rank 0 (see its log)")

    def _monitor_main(self, model: nn.Module, state: TrainState) -> None:
        start = time.perf_counter()
        model.eval()
        try:
            with torch.no_grad():
                result = self.task.monitor(model, state.step, self.run_dir)
        finally:
            model.train()
        if result is None:
            return
        record: dict[str, Any] = {"kind": "eval", "step": state.step, "epoch": state.epoch,
                                  **result, "eval_seconds": time.perf_counter() - start}
        self.monitors.append(record)
        self.write(record)
        shown = " ".join(f"{k} {v:.4g}" for k, v in result.items()
                         if isinstance(v, float | int) and not isinstance(v, bool))
        log.info("eval at step %d: %s (%.1f s)", state.step, shown, record["eval_seconds"])


def _hms(seconds: float) -> str:
    """4:05:09 (hours:minutes:seconds), or ? when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


DATA_WAIT_HINT = 0.10  # above this fraction of the step spent waiting, say what would help


def data_wait_hint(wait: float, workers: int, *, gpu_decode: bool = False) -> str:
    """"" while the step waits for data at most 10% of its time; else what would remove the
    wait: the workers that would deliver the images/s the step could take (`workers_needed`:
    the loader, the limit, delivers the current rate, which the wait's share holds back),
    or GPU decoding."""
    if not DATA_WAIT_HINT < wait <= 1:
        return ""
    busy = max(1.0 - wait, 0.01)  # the share of the step the model computes
    if workers == 0:  # loading and computing in turn: a worker loads while the model computes
        need = workers_needed(wait / busy, 1.0)
        more = f"data.num_workers = {need}"
    else:  # rates in units of one worker's
        need = workers_needed(workers / busy, 1.0)
        more = f"{need - workers} more worker{'s' if need - workers > 1 else ''} per rank"
    also = "" if gpu_decode else ", or data.decode = 'gpu',"
    return f" ({more}{also} would remove it, CPU cores allowing)"
