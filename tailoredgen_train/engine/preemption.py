"""SIGTERM / SIGINT handling that only sets a flag: the loop stops at the next step boundary.

The handler does no I/O (saving inside a signal handler can corrupt what it interrupts); the
trainer checks `requested` after each optimizer step, saves resume state, and exits 128+signum.
A second SIGINT while a stop is pending gets the default behaviour (an impatient Ctrl-C works). A
repeated SIGTERM does not: it is the same stop delivered twice (Slurm signals every process of a job
step, and accelerate's launcher forwards the signal to its workers once more), so saving goes on.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        if self.requested is not None:
            if signum == signal.SIGTERM:  # the pending stop, delivered again: let it finish saving
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum

    def install(self) -> StopFlag:
        # Python delivers signals to the main thread only; elsewhere the flag stays unset
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
