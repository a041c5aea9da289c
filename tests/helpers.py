"""Helpers for tests: quiet tiny engine settings, engine-level hyperparameters, small runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tailoredgen_train.config import EngineConfig, engine_config_from_dict
from tailoredgen_train.contract import TrainingParameters
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.recipe import JobSpec, TrainingResult, run_training


def tiny_engine(**sections) -> EngineConfig:
    """The demo's engine settings, quiet: every step logged to nothing, no trackers, no validation
    renders (tests/test_validation.py turns them on)."""
    raw = {"data": {"resolution": 128, "min_side": 128}, "run": {"log_with": "none", "log_every": 1},
           "validation": {"enabled": False}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return engine_config_from_dict(raw)


def params(steps: int, *, lr: float = 1e-3, rank: int = 8, interval: int | None = None,
           scheduler: str = "constant") -> TrainingParameters:
    """Engine-level hyperparameters: built directly, so tests may use intervals and learning rates the
    public contract refuses (the contract itself is tested in test_contract.py)."""
    return TrainingParameters(learning_rate=lr, lr_scheduler=scheduler, rank=rank, total_training_steps=steps,
                              checkpoint_interval=interval or steps, lr_warmup_steps=None)


def subset_dataset(dest: Path, count: int, source: Path = SAMPLE_DATASET_DIR) -> Path:
    """The first `count` images of a sample dataset, copied (tests never write into the package)."""
    dest.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines() if line.strip()]
    for row in rows[:count]:
        shutil.copy(source / row["file_name"], dest / row["file_name"])
    (dest / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:count]))
    return dest


def train(base: Path, output: Path, training_params: TrainingParameters, *, dataset: Path = SAMPLE_DATASET_DIR,
          engine: EngineConfig | None = None, resume: bool = False) -> TrainingResult:
    return run_training(JobSpec(base=str(base), dataset_dir=str(dataset), output_dir=str(output),
                                training_version="fibo", params=training_params, engine=engine or tiny_engine(),
                                resume=resume))
