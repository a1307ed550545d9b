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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cratemae.errors import CrateMAEError
from cratemae.recipe.schema import RunSection
from cratemae.train.state import TrainState

__all__ = ["NanGuard", "Rollback"]


@dataclass(frozen=True)
class Rollback:
    """One recovery: where to, why, and what the run trains with after it."""

    checkpoint: Path
    at_step: int  # the step whose non-finite loss filled the window
    reason: str
    lr_factor: float  # on the scheduled learning rate from now on (all recoveries so far)
    fp32: bool  # the step trains in float32 from now on
    number: int  # 1 for the run's first recovery

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
                f"({_shown(self.checkpoint, run_dir)}), lr x{self.lr_factor:g}{fp32}, "
                f"recovery {self.number} of {max_recoveries}")


class NanGuard:
    """Watches the steps' finite / skipped verdicts and decides when and how to recover."""

    def __init__(self, run: RunSection) -> None:
        self.run = run
        self.recent: deque[bool] = deque(maxlen=run.nan_window or run.nan_patience)  # skipped?

    def tripped(self, ok: bool) -> bool:
        """Note one step's verdict; True when the window holds `nan_patience` skipped steps."""
        self.recent.append(not ok)
        return sum(self.recent) >= self.run.nan_patience

    def reason(self, step: int) -> str:
        bad = sum(self.recent)
        if self.run.nan_window is None:
            return f"{bad} non-finite losses in a row at step {step}"
        return f"{bad} non-finite losses in the last {len(self.recent)} steps at step {step}"

    def decide(self, state: TrainState, checkpoint: Path | None) -> Rollback:
        """The rollback to carry out, after the window filled at `state.step`; `checkpoint`:
        the last one this run saved or resumed from (None: none yet). Raises
        `CrateMAEError` (exit status 1) when the run must stop instead."""
        run, reason = self.run, self.reason(state.step)
        last = (f"last good checkpoint: {checkpoint}" if checkpoint is not None
                else "no checkpoint saved yet")
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
                        number=state.recoveries + 1)


def _shown(path: Path, run_dir: Path) -> str:
    """`checkpoints/step-...` inside the run, the whole path elsewhere (a resumed-from one)."""
    try:
        return str(path.relative_to(run_dir))
    except ValueError:
        return str(path)
