"""SIGTERM / SIGUSR1 ask the run to save and stop at the next step boundary."""

from __future__ import annotations

import logging
import signal
import types

__all__ = ["PreemptionFlag"]

log = logging.getLogger("cratemae")


class PreemptionFlag:
    """Installs handlers that only set a flag; the training loop acts on it between steps,
    after all ranks agree, so no checkpoint is ever written from inside a signal handler."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: saving a checkpoint at the next step, then stopping",
                        signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
