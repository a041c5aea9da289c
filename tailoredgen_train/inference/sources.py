"""Where a LoRA comes from on the command line: a `pytorch_lora_weights.safetensors` file, a
checkpoint folder, or a run folder (its newest checkpoint, or `--checkpoint-step N`). A LoRA from a
run also brings the run's job.json: its family, training resolution and caption prefix."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.checkpoint import LORA_FILE, Checkpointer
from ..errors import LoraFileError, NotFoundError, TailoredGenError
from ..families import family_for_version, load_version_map

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class LoraSource:
    file: Path
    step: int | None = None
    run_dir: Path | None = None
    job: dict[str, Any] | None = None
    """The run's job.json, when the LoRA sits in a run folder."""
    note: str | None = None
    """What was chosen for the user (the newest checkpoint of a run)."""

    @property
    def training_resolution(self) -> int | None:
        try:
            return int(self.job["engine"]["data"]["resolution"])
        except (TypeError, KeyError, ValueError):
            return None

    @property
    def caption_prefix(self) -> str | None:
        return (self.job or {}).get("caption_prefix")

    @property
    def family_name(self) -> str | None:
        """The family the run trained, or None when unknown (no job.json, or its version map is gone)."""
        if not self.job or "training_version" not in self.job:
            return None
        try:
            version_map = load_version_map(self.job.get("version_map"))
            return family_for_version(self.job["training_version"], None, version_map).name
        except TailoredGenError:
            return None


def _read_job(run_dir: Path) -> dict[str, Any] | None:
    try:
        job = json.loads((run_dir / "job.json").read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def _step_of(folder: Path) -> int | None:
    match = _CHECKPOINT_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def find_lora(path: str | Path, checkpoint_step: int | None = None) -> LoraSource:
    """Resolve `--lora PATH [--checkpoint-step N]`; every refusal names the flag and the fix."""
    path = Path(path).expanduser()
    kinds = f"a checkpoint folder (checkpoint-<step>/), its {LORA_FILE}, or a run folder"
    if not path.exists():
        raise LoraFileError(f"--lora {path} does not exist; pass {kinds}")
    if path.is_file() or (path / LORA_FILE).is_file():
        if checkpoint_step is not None:
            raise LoraFileError(f"--checkpoint-step {checkpoint_step} picks a checkpoint of a run folder, but --lora "
                                f"{path} is a single LoRA; drop --checkpoint-step or pass the run folder")
        file = path if path.is_file() else path / LORA_FILE
        folder = file.parent
        step = _step_of(folder)
        run_dir = folder.parent if step is not None and (folder.parent / "job.json").is_file() else None
        return LoraSource(file=file, step=step, run_dir=run_dir, job=_read_job(run_dir) if run_dir else None)

    run = Checkpointer(path)
    steps = run.published_steps()
    if not steps:
        raise LoraFileError(f"--lora {path} holds no {LORA_FILE} and no checkpoint-<step>/ folder; pass {kinds}")
    if checkpoint_step is not None:
        if checkpoint_step not in steps:
            raise NotFoundError(f"--checkpoint-step {checkpoint_step}: run {path} has no such checkpoint; "
                                f"available steps: {', '.join(str(s) for s in sorted(steps))}")
        if not run.verify(run.path_for(checkpoint_step)):
            raise LoraFileError(f"--checkpoint-step {checkpoint_step}: {run.path_for(checkpoint_step)} is damaged "
                                "(its manifest does not match its files); pick another step")
        step, note = checkpoint_step, None
    else:
        valid = [s for s in steps if run.verify(run.path_for(s))]
        if not valid:
            raise LoraFileError(f"--lora {path}: no checkpoint of this run verifies against its manifest "
                                f"(steps {', '.join(str(s) for s in sorted(steps))})")
        step = valid[0]
        note = (f"using the newest checkpoint of {path}: step {step} (of {', '.join(str(s) for s in sorted(steps))});"
                " --checkpoint-step picks another")
    return LoraSource(file=run.path_for(step) / LORA_FILE, step=step, run_dir=path, job=_read_job(path), note=note)
