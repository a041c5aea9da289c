"""One training per output folder: an flock on OUTPUT/train.lock, held for the run's whole life.

The kernel drops an flock when the process holding it dies, however it dies (SIGKILL, OOM), so the
lock is never stale and there is nothing to clean up. The file itself stays (deleting it would let
a third process lock a new file while a second still holds the old one); its text names the
current holder (pid, host, start time) for the refusal message. Only the main process locks.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from ..errors import OutputInUseError

LOCK_FILE = "train.lock"


class OutputLock:
    """`OutputLock(dir).acquire()` or refuse with OutputInUseError; `release()` (or process death) frees it."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputInUseError(
                f"--output {self.path.parent} is in use by another training ({self.holder()}; lock {self.path}): "
                "wait for it to end or stop it, or choose another --output."
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> str:
        """'pid 123 on host h, started 2026-12-02T03:50:00+00:00' from the lock file's text."""
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):  # the holder has not written its details yet
            return "its pid, host and start time are not written yet"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def lock_output(output_dir: str | Path, *, is_main_process: bool) -> OutputLock | None:
    """The main process's lock on `output_dir`; None on other processes, or when the folder cannot
    be made or written (the run's own checks then report that, naming the fix)."""
    if not is_main_process:
        return None
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        return OutputLock(output_dir).acquire()
    except OSError:
        return None
