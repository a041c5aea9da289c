"""SIGTERM / SIGINT handling that only sets a flag: the loop stops at the next step boundary.

The handler does no I/O (saving inside a signal handler can corrupt what it interrupts); the
trainer checks `requested` after each optimizer step, saves resume state, and exits 128+signum.
A second SIGINT while a stop is pending gets the default behaviour (an impatient Ctrl-C works). A
repeated SIGTERM does not: it is the same stop delivered twice (Slurm signals every process of a job
step, and accelerate's launcher forwards the signal to its workers once more), so saving goes on.

A stop can also be asked for with a file, OUTPUT/stop-requested (`request_stop`): unlike a signal
it is durable, so a stop sent before the process exists, or while it loads, is honoured at its
start-up check or at its next step boundary, and a restarted process stops too.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_FILE = "stop-requested"


class StopFlag:
    def __init__(self, stop_file: Path | None = None) -> None:
        self.stop_file = stop_file
        self._signal: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> int | None:
        """The stop signal received, SIGTERM when the stop file exists, else None (one stat a step)."""
        if self._signal is None and self.stop_file is not None and self.stop_file.exists():
            return signal.SIGTERM
        return self._signal

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        if self._signal is not None:
            if signum == signal.SIGTERM:  # the pending stop, delivered again: let it finish saving
                return
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self._signal = signum

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


def request_stop(output_dir: str | Path) -> Path:
    """Ask the run in `output_dir` to stop, durably: the file is on disk (fsynced) when this returns."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STOP_FILE
    with open(path, "a") as handle:
        os.fsync(handle.fileno())
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name survives a power loss too
    finally:
        os.close(directory)
    return path
