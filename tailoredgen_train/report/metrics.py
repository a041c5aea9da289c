"""OUTPUT/metrics.jsonl: one JSON line per optimizer step, appended by the main process.

    {"step": 12, "loss": 0.41, "lr": 0.0001, "grad_norm": 0.8, "seconds": 0.52, "skipped": false, "time": 1767...}

A resumed run appends after the old lines and redoes some steps; a killed run may leave a torn last
line. Readers therefore skip lines that do not parse, and a step that comes again (a rewind)
replaces what the earlier pass wrote from that step on. Non-finite numbers are written as null so
that every line is strict JSON (the service passes these values on to HTTP clients).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"
JOB_FILE = "job.json"
TAIL_BYTES = 64 * 1024  # ~500 lines: enough for the recent-step window, whatever the file's size
RECENT_STEPS = 50


def finite_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def record_fields(record: Any) -> dict[str, Any]:
    """A StepRecord (or a dict with its fields) as a metrics line, without `time`."""
    get = record.get if isinstance(record, dict) else lambda name, default=None: getattr(record, name, default)
    return {"step": int(get("step")), "loss": finite_or_none(get("loss")), "lr": finite_or_none(get("lr")),
            "grad_norm": finite_or_none(get("grad_norm")), "seconds": finite_or_none(get("seconds")),
            "skipped": bool(get("skipped", False))}


class MetricsLog:
    """Appends step records to OUTPUT/metrics.jsonl; one flush per line, no fsync (a lost tail after
    a power cut costs only a few plot points). Only the main process should write."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE
        self._handle = None

    def _open(self):
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = False
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    torn = existing.read(1) != b"\n"
            self._handle = open(self.path, "a", encoding="utf-8")
            if torn:  # a killed run's partial line must not swallow our first record
                self._handle.write("\n")
        return self._handle

    def append(self, record: Any) -> None:
        line = {**record_fields(record), "time": round(time.time(), 3)}
        handle = self._open()
        handle.write(json.dumps(line, allow_nan=False) + "\n")
        handle.flush()

    def extend(self, records: Iterable[Any]) -> None:
        for record in records:
            self.append(record)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None  # torn or foreign
    if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
        return None
    return record


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every step's record, sorted by step. The last record of a step wins; when a resumed run goes
    back to step s, what the earlier pass wrote for s and later is dropped (it was undone)."""
    try:
        text = (Path(run_dir) / METRICS_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    by_step: dict[int, dict[str, Any]] = {}
    previous = None
    for line in text.splitlines():
        record = _parse(line)
        if record is None:
            continue
        step = record["step"]
        if previous is not None and step <= previous:
            by_step = {s: r for s, r in by_step.items() if s < step}
        by_step[step] = record
        previous = step
    return [by_step[s] for s in sorted(by_step)]


def tail_lines(path: Path, max_bytes: int) -> list[str]:
    """The whole lines in the last max_bytes of a file (the first is dropped when it began earlier)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        handle.seek(start)
        data = handle.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if start > 0 else lines


def total_steps_from(job: Any) -> int | None:
    """total_training_steps of a job.json's content; None when it is not there."""
    try:
        total = job["params"]["total_training_steps"]
    except (KeyError, TypeError):
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def total_steps_of(run_dir: str | Path) -> int | None:
    """total_training_steps from the run's job.json; None when it is missing or unreadable."""
    try:
        return total_steps_from(json.loads((Path(run_dir) / JOB_FILE).read_text()))
    except (OSError, ValueError):
        return None


def read_progress(run_dir: str | Path, total_steps: int | None = None, *,
                  tail_bytes: int = TAIL_BYTES) -> dict[str, Any] | None:
    """Where a run stands, from the tail of its metrics file only (cheap on every API poll).

    step_seconds is the median `seconds` of the recent steps. eta_s uses the wall-clock pace of the
    recent steps of the current process when their timestamps allow it (that includes checkpoint
    writes and sample renders, and holds when the loss is read back only every few steps), else
    step_seconds. None when the run has no metrics yet."""
    path = Path(run_dir) / METRICS_FILE
    try:
        records = [r for r in map(_parse, tail_lines(path, tail_bytes)) if r is not None]
    except OSError:
        return None
    if not records:
        return None
    # the current process's records: from the end back to the last rewind (a resume)
    start = len(records) - 1
    while start > 0 and records[start - 1]["step"] < records[start]["step"]:
        start -= 1
    current = records[start:]
    recent = current[-RECENT_STEPS:]
    last = current[-1]
    total = total_steps if total_steps is not None else total_steps_of(run_dir)

    seconds = [s for s in (finite_or_none(r.get("seconds")) for r in recent) if s is not None]
    step_seconds = statistics.median(seconds) if seconds else None
    pace = step_seconds
    last_time = finite_or_none(last.get("time"))
    if last_time is not None:
        def earlier(record: dict[str, Any]) -> bool:
            return (t := finite_or_none(record.get("time"))) is not None and t < last_time

        anchor = recent[0] if earlier(recent[0]) else None
        if anchor is None:  # steps written together at one host sync share a time: reach further back
            anchor = next((r for r in reversed(current[:-len(recent)]) if earlier(r)), None)
        if anchor is not None:
            pace = (last_time - anchor["time"]) / (last["step"] - anchor["step"])
    losses = [r for r in current if not r.get("skipped") and finite_or_none(r.get("loss")) is not None]
    eta = None
    if total is not None and pace is not None:
        eta = max(total - last["step"], 0) * pace
    return {
        "step": last["step"],
        "total_steps": total,
        "loss": losses[-1]["loss"] if losses else None,
        "step_seconds": step_seconds,
        "eta_s": eta,
        "updated_at": last_time,
    }
