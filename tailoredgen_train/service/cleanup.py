"""What a finished job keeps on disk: its published checkpoints, always, and of its resume states
only the newest that verifies; not its feature cache (FIBO: ~245 MB per 1536-token caption). The
cache and the older resume states are most of a finished run folder's size."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..engine.checkpoint import Checkpointer

log = logging.getLogger(__name__)


def prune_finished_run(run_dir: Path) -> list[Path]:
    """Delete RUN/cache/ and every RUN/resume/ entry but the newest valid state; return what went.
    A cache elsewhere (run.cache_dir) may be shared between jobs and is left alone, and nothing
    outside cache/ and resume/ (checkpoint-N/, logs, samples, the report) is touched."""
    run_dir = Path(run_dir)
    checkpointer = Checkpointer(run_dir, is_main_process=False)
    newest = checkpointer.latest_resume()
    doomed = [run_dir / "cache"]
    if checkpointer.resume_root.is_dir():
        doomed += [path for path in checkpointer.resume_root.iterdir() if path != newest]
    removed = []
    for path in doomed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    if removed:
        log.info("pruned the finished run %s: %s", run_dir, ", ".join(str(p.relative_to(run_dir)) for p in removed))
    return removed
