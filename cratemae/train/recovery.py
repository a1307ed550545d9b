"""Runs that survive a NaN: when non-finite losses call for a rollback, to where, and what
changes after it.

The step skips a step whose loss is not finite on any rank (`cratemae.train.step`), and that
verdict is all-reduced, so every rank feeds `NanGuard` the same sequence and reaches the same
decision without a collective of its own. The guard counts skipped steps in a window
(`run.nan_patience` of the last `run.nan_window` steps; no window: `nan_patience` in a row)
and, when the window fills, says what to do (`run.nan_recovery`): roll back to the last
checkpoint with the learning rate lowered by `run.nan_lr_factor` (and, for
"rollback_fp32", in float32 from then on), or stop the run. The trainer carries the
rollback out (`Trainer._roll_back`); this module decides and words it.

A rollback without a change would repeat the diverging steps exactly (same batches, same
masks, same RNG states: that is what exact resume means), hence the default factor 0.5.

What the guard says: one warning per `run.nan_window` steps (no window: per `nan_patience`)
with the count of steps skipped in it, never one line a step; a rollback names the
checkpoint it goes to with that checkpoint's last logged loss, and says so when that loss
was already far above the run's best (the checkpoint is then the last one, not a good one).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cratemae.errors import CrateMAEError
from cratemae.recipe.schema import RunSection
from cratemae.train.state import TrainState

__all__ = ["NanGuard", "Rollback", "checkpoint_words"]

# A checkpoint whose last loss is this much above the run's best (relative to it) was
# already diverging when it was saved: it is named "the last checkpoint", not a good one.
FAR_ABOVE_BEST = 0.5


@dataclass(frozen=True)
class Rollback:
    """One recovery: where to, why, and what the run trains with after it."""

    checkpoint: Path
    at_step: int  # the step whose non-finite loss filled the window
    reason: str
    lr_factor: float  # on the scheduled learning rate from now on (all recoveries so far)
    fp32: bool  # the step trains in float32 from now on
    number: int  # 1 for the run's first recovery
    loss: float | None = None  # the checkpoint's last logged loss, if known
    best: float | None = None  # the run's best logged loss so far, if known

    def record(self, step: int, precision: str, run_dir: Path) -> dict[str, Any]:
        """The `"kind": "recovery"` line of metrics.jsonl. Its `step` is the step the run
        continues from (= `rolled_back_to`), so the line sorts with the training lines that
        follow and a later resume (from that step or after) keeps it."""
        return {"kind": "recovery", "step": step, "rolled_back_to": step,
                "at_step": self.at_step, "checkpoint": _shown(self.checkpoint, run_dir),
                "reason": self.reason, "lr_factor": self.lr_factor, "precision": precision,
                "recovery": self.number}

    def warning(self, step: int, max_recoveries: int, run_dir: Path) -> str:
        """The one log line of a recovery."""
        fp32 = ", float32 from now on" if self.fp32 else ""
        return (f"{self.reason}; rolled back to step {step} "
                f"({_shown(self.checkpoint, run_dir)}{_loss_words(self.loss, self.best)}), "
                f"lr x{self.lr_factor:g}{fp32}, recovery {self.number} of {max_recoveries}")


class NanGuard:
    """Watches the steps' finite / skipped verdicts and decides when and how to recover."""

    def __init__(self, run: RunSection) -> None:
        self.run = run
        self.recent: deque[bool] = deque(maxlen=run.nan_window or run.nan_patience)  # skipped?
        self.period = run.nan_window or run.nan_patience  # steps per warning
        self.unreported: list[int] = []  # steps skipped since the last warning

    def tripped(self, ok: bool, step: int = 0) -> bool:
        """Note one step's verdict (`step`: its number); True when the window holds
        `nan_patience` skipped steps."""
        self.recent.append(not ok)
        if not ok:
            self.unreported.append(step)
        return sum(self.recent) >= self.run.nan_patience

    def report(self, step: int, *, final: bool = False) -> str | None:
        """The one warning of the period of `period` steps that ends at `step` (or of what
        is left at the end of the run, `final`), when steps were skipped in it; else None."""
        if not self.unreported or not (final or step % self.period == 0):
            return None
        skipped, self.unreported = self.unreported, []
        where = (f"at step {skipped[0]}" if len(skipped) == 1
                 else f"between steps {skipped[0]} and {skipped[-1]}")
        steps = "1 step" if len(skipped) == 1 else f"{len(skipped)} steps"
        return f"non-finite loss: {steps} skipped {where}"

    def reason(self, step: int) -> str:
        bad = sum(self.recent)
        if self.run.nan_window is None:
            return f"{bad} non-finite losses in a row at step {step}"
        return f"{bad} non-finite losses in the last {len(self.recent)} steps at step {step}"

    def decide(self, state: TrainState, checkpoint: Path | None, *,
               loss: float | None = None, best: float | None = None) -> Rollback:
        """The rollback to carry out, after the window filled at `state.step`; `checkpoint`:
        the last one this run saved or resumed from (None: none yet), `loss` its last logged
        loss and `best` the run's best (when known). Raises `CrateMAEError` (exit status 1)
        when the run must stop instead."""
        run, reason = self.run, self.reason(state.step)
        self.unreported = []  # the reason counts them
        last = checkpoint_words(checkpoint, loss, best)
        if run.nan_recovery == "stop":
            raise CrateMAEError(f"{reason} (run.nan_recovery = \"stop\"); {last}")
        if checkpoint is None:
            raise CrateMAEError(
                f"{reason}, and no checkpoint of this run to roll back to: it diverged before "
                f"its first save (lower the learning rate, or save sooner with "
                f"run.checkpoint_every_steps)")
        if state.recoveries >= run.nan_max_recoveries:
            raise CrateMAEError(
                f"{reason}, after {state.recoveries} rollback(s) (run.nan_max_recoveries = "
                f"{run.nan_max_recoveries}): the run keeps diverging; {last}")
        self.recent.clear()
        return Rollback(checkpoint=checkpoint, at_step=state.step, reason=reason,
                        lr_factor=state.lr_factor * run.nan_lr_factor,
                        fp32=state.fp32 or run.nan_recovery == "rollback_fp32",
                        number=state.recoveries + 1, loss=loss, best=best)


def _far(loss: float | None, best: float | None) -> bool:
    return loss is not None and best is not None and loss - best > FAR_ABOVE_BEST * abs(best)


def _loss_words(loss: float | None, best: float | None) -> str:
    """`, loss 0.41` or `, loss 2.3, already far above the run's best 0.41`; '' unknown."""
    if loss is None:
        return ""
    far = f", already far above the run's best {best:.4g}" if _far(loss, best) else ""
    return f", loss {loss:.4g}{far}"


def checkpoint_words(checkpoint: Path | None, loss: float | None = None,
                     best: float | None = None) -> str:
    """How a stop names where the run can go on from: "last good checkpoint: X (loss l)",
    or "last checkpoint: X (loss l, already far above the run's best b)" when it was
    diverging already, or "no checkpoint saved yet"."""
    if checkpoint is None:
        return "no checkpoint saved yet"
    kind = "last checkpoint" if _far(loss, best) else "last good checkpoint"
    words = _loss_words(loss, best)
    return f"{kind}: {checkpoint}" + (f" ({words[2:]})" if words else "")


def _shown(path: Path, run_dir: Path) -> str:
    """`checkpoints/step-...` inside the run, the whole path elsewhere (a resumed-from one)."""
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)
