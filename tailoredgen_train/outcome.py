"""How a job ended, written next to its checkpoints so that whoever launched it can read it back.

`run-job` writes OUTPUT/result.json (rank 0) or OUTPUT/result.rank<N>.json (another rank that
failed) atomically as its last act. A process that is killed writes nothing: no file means the
job was lost, not that it failed.

    {"status": "completed" | "failed" | "preempted", "code", "message", "final_step", "rank",
     "summary": {...} | null}

`summary` is what `report.result.summarize_run` measured: losses, steps, times, peak memory and
the published checkpoints (see that module). This is the one writer of result.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

RESULT_FILE = "result.json"
Status = Literal["completed", "stopped", "failed", "preempted"]
"""stopped: the run ended itself early (run.stop_after_steps); preempted: a signal stopped it."""


def process_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def write_outcome(output_dir: str | Path, status: Status, *, code: str | None = None, message: str | None = None,
                  final_step: int | None = None, rank: int | None = None,
                  summary: dict[str, Any] | None = None) -> Path:
    rank = process_rank() if rank is None else rank
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    target = output / (RESULT_FILE if rank == 0 else f"result.rank{rank}.json")
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    payload = {"status": status, "code": code, "message": message, "final_step": final_step, "rank": rank,
               "summary": summary}
    with open(staging, "w") as handle:
        json.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, target)
    return target


def read_outcome(output_dir: str | Path) -> dict[str, Any] | None:
    """The job's outcome: a failure on any rank wins over rank 0's report; None when nothing was written."""
    output = Path(output_dir)
    found = []
    for path in sorted(output.glob("result*.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a torn or foreign file is no outcome
    failed = [o for o in found if o.get("status") == "failed"]
    if failed:
        return failed[0]
    main = [o for o in found if o.get("rank", 0) == 0]
    return main[0] if main else None


def clear_outcome(output_dir: str | Path) -> None:
    """Before a relaunch: a previous attempt's outcome must not be read as this one's."""
    for path in Path(output_dir).glob("result*.json"):
        path.unlink(missing_ok=True)
