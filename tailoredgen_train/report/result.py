"""The summary that result.json carries next to how the run ended (`outcome.write_outcome` writes it).

    {"steps_done": 750, "total_steps": 750, "final_loss": 0.31, "best_loss": 0.12, "best_loss_step": 412,
     "skipped_steps": 0, "wall_time_s": 1830.2, "step_seconds_mean": 2.41, "step_seconds_median": 2.38,
     "peak_memory": {"device": "cuda", "device_allocated_gib": 61.2, "device_reserved_gib": 64.0,
                     "host_rss_gib": 21.5},
     "checkpoints": [{"step": 500, "path": "checkpoint-500"}, {"step": 750, "path": "checkpoint-750"}]}

Losses ignore skipped and non-finite steps. Checkpoint paths are relative to the run folder (each
holds pytorch_lora_weights.safetensors). Peak memory is this process's (rank 0's on several GPUs):
device memory as PyTorch's allocator counts it (None without CUDA), host memory as peak RSS.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ..engine.checkpoint import MANIFEST, Checkpointer
from .metrics import finite_or_none, read_metrics, record_fields, total_steps_of

GIB = 1024**3


def published_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Published checkpoint folders, oldest first. A folder is renamed into place complete, so its
    manifest's presence is enough here (hashing every LoRA file would make this slow)."""
    checkpointer = Checkpointer(Path(run_dir))
    steps = sorted(s for s in checkpointer.published_steps() if (checkpointer.path_for(s) / MANIFEST).is_file())
    return [{"step": s, "path": checkpointer.path_for(s).name} for s in steps]


def peak_memory() -> dict[str, Any]:
    """This process's peak memory so far. torch is only consulted if already imported (a process
    that never imported it used no accelerator)."""
    # ru_maxrss is KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    memory: dict[str, Any] = {"device": "cpu", "device_allocated_gib": None, "device_reserved_gib": None,
                              "host_rss_gib": round(rss / GIB, 3)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        memory.update(device="cuda", device_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 3),
                      device_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 3))
    return memory


def summarize(records: Iterable[Any], *, total_steps: int | None = None,
              checkpoints: list[dict[str, Any]] | None = None, wall_time_s: float | None = None,
              memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summary of step records: `read_metrics(run_dir)` (the whole run, resumes included) or a
    Trainer's history (this process's steps only); StepRecords and metrics dicts both work."""
    rows = [record_fields(r) for r in records]
    trained = [r for r in rows if not r["skipped"] and r["loss"] is not None]
    best = min(trained, key=lambda r: r["loss"]) if trained else None
    seconds = [r["seconds"] for r in rows if r["seconds"] is not None]
    return {
        "steps_done": max((r["step"] for r in rows), default=0),
        "total_steps": total_steps,
        "final_loss": trained[-1]["loss"] if trained else None,
        "best_loss": best["loss"] if best else None,
        "best_loss_step": best["step"] if best else None,
        "skipped_steps": sum(1 for r in rows if r["skipped"] or r["loss"] is None),
        "wall_time_s": round(wall_time_s, 3) if finite_or_none(wall_time_s) is not None else None,
        "step_seconds_mean": round(statistics.fmean(seconds), 4) if seconds else None,
        "step_seconds_median": round(statistics.median(seconds), 4) if seconds else None,
        "peak_memory": memory,
        "checkpoints": list(checkpoints or []),
    }


def summarize_run(run_dir: str | Path, *, started_at: float | None = None,
                  total_steps: int | None = None) -> dict[str, Any]:
    """The summary for result.json, read from the run folder; call it from the training process (its
    peak memory is measured). `started_at` is this process's `time.time()` at its start: the wall
    time then counts loading, caching and training (a resumed run: since its resume)."""
    return summarize(
        read_metrics(run_dir),
        total_steps=total_steps if total_steps is not None else total_steps_of(run_dir),
        checkpoints=published_checkpoints(run_dir),
        wall_time_s=time.time() - started_at if started_at is not None else None,
        memory=peak_memory(),
    )
