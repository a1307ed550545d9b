"""SIGTERM / SIGUSR1 ask the run to save and stop at the next step boundary.

SLURM's preemption and `scancel` signal every process of a job, at any moment: while the
command starts (imports, data listing, model build, resume) as well as while it trains. The
request is therefore remembered for the whole process, from the moment the first
`PreemptionFlag` is entered until the last one is left, so a signal that arrives during
start-up still makes the first step boundary save and stop. DataLoader workers ignore the
two signals (`ignore_stop_signals`): their parent decides when to stop and ends them.
"""

from __future__ import annotations

import logging
import signal
import types
from typing import ClassVar

__all__ = ["PreemptionFlag", "ignore_stop_signals"]

log = logging.getLogger("cratemae")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class _State:
    depth: ClassVar[int] = 0  # PreemptionFlags entered and not yet left
    signum: ClassVar[int | None] = None  # the first stop signal received while entered
    previous: ClassVar[dict[int, object]] = {}  # the handlers the outermost flag replaced


class PreemptionFlag:
    """Installs handlers that only set a flag; the training loop acts on it between steps,
    after all ranks agree, so no checkpoint is ever written from inside a signal handler.
    Flags nest: an inner one sees a signal that reached an outer one."""

    SIGNALS = SIGNALS

    def __enter__(self) -> PreemptionFlag:
        if _State.depth == 0:
            _State.signum = None
            _State.previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
        _State.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        _State.depth -= 1
        if _State.depth == 0:
            for sig, handler in _State.previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            _State.signum = None

    @property
    def signum(self) -> int | None:
        return _State.signum

    @property
    def requested(self) -> bool:
        return _State.signum is not None


def _handle(signum: int, frame: types.FrameType | None) -> None:
    if _State.signum is None:
        log.warning("received %s: stopping at the next step (a training run saves a "
                    "checkpoint first)",
                    signal.Signals(signum).name)
    _State.signum = signum


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: SIGTERM/SIGUSR1 sent to the whole process group leave
    the worker running, so the main process can finish its step, save and stop them."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
