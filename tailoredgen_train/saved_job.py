"""`train --output DIR --resume`: continue the job the run saved in DIR/job.json, never a silently other one.

Base, dataset, training_version, hyperparameters and engine config all come from the saved job. A
flag given with --resume must agree with it: each field that differs is refused by name with both
values (`rank: 128 → 64`), unless `--set run.allow_changed_on_resume=[...]` names the field. Two
settings belong to one invocation and are neither carried over nor compared: run.stop_after_steps
and run.allow_changed_on_resume.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .config import EngineConfig, RunConfig, apply_overrides, load_engine_config
from .contract import TrainingParameters, canonical_version, resolve_training_parameters
from .errors import InvalidParameterError, ResumeError, did_you_mean
from .recipe import JobSpec
from .report.metrics import JOB_FILE

log = logging.getLogger(__name__)

PER_INVOCATION = ("run.stop_after_steps", "run.allow_changed_on_resume")
# a resume state holds a LoRA of one shape: these cannot change whatever the allow list says
FIXED_SHAPE = ("rank", "lora.target_modules")
_PATH_FIELDS = ("base", "dataset", "version_map")


@dataclass(frozen=True)
class Change:
    field: str
    saved: Any
    given: Any

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.saved)} → {_show(self.given)}"


def _show(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def load_saved_job(output_dir: str | Path) -> JobSpec | None:
    """The job a run saved in OUTPUT/job.json; None when the folder holds none."""
    path = Path(output_dir) / JOB_FILE
    if not path.is_file():
        return None
    try:
        return JobSpec.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ResumeError(f"--resume: {path} cannot be read as a saved job ({type(exc).__name__}: {exc}); pass "
                          "--base, --dataset, --training-version and the other flags of the run to start it again "
                          "with --overwrite, or choose a new --output") from None


def job_fields(job: JobSpec) -> dict[str, Any]:
    """What a job computes, one entry per field under the names users type: base, dataset,
    training_version, caption_prefix, version_map, the contract's hyperparameters (rank, ...) and the
    engine config's dotted keys (data.resolution, model.max_sequence_length, family)."""
    fields: dict[str, Any] = {"base": job.base, "dataset": job.dataset_dir,
                              "training_version": canonical_version(job.training_version),
                              "caption_prefix": job.caption_prefix, "version_map": job.version_map,
                              **job.params.to_dict()}
    for section, values in job.engine.to_dict().items():
        if isinstance(values, dict):
            fields.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            fields[section] = values
    for name in PER_INVOCATION:
        fields.pop(name, None)
    return fields


def _same(name: str, saved: Any, given: Any) -> bool:
    if saved == given:
        return True
    # the same folder written another way (relative, through a link) is the same input
    return name in _PATH_FIELDS and None not in (saved, given) and os.path.realpath(saved) == os.path.realpath(given)


def job_changes(saved: JobSpec, requested: JobSpec) -> list[Change]:
    before, after = job_fields(saved), job_fields(requested)
    return [Change(name, before.get(name), after.get(name)) for name in sorted(before.keys() | after.keys())
            if not _same(name, before.get(name), after.get(name))]


def check_changes(saved: JobSpec, requested: JobSpec, job_file: Path) -> list[Change]:
    """Refuse every difference the allow list does not name (ResumeError listing them all); return
    the allowed ones."""
    allowed = requested.engine.run.allow_changed_on_resume
    known = sorted(job_fields(saved).keys() | job_fields(requested).keys())
    unknown = [name for name in allowed if name not in known]
    if unknown:
        raise ResumeError(f"--set run.allow_changed_on_resume: {unknown[0]} is not a field of the job"
                          f"{did_you_mean(unknown[0], known)}; name fields as the refusal lists them, e.g. "
                          "total_training_steps or data.resolution")
    changes = job_changes(saved, requested)
    refused = [c for c in changes if c.field not in allowed]
    if refused:
        names = ",".join(c.field for c in refused)
        raise ResumeError(
            f"--resume continues the job saved in {job_file}, and these flags change it: "
            f"{'; '.join(map(str, refused))}. Leave them out (--output DIR --resume needs no other flag), or allow "
            f"the change with --set run.allow_changed_on_resume=[{names}]."
        )
    fixed = [c for c in changes if c.field in FIXED_SHAPE]
    if fixed:
        raise ResumeError(f"--resume cannot change the LoRA's shape ({'; '.join(map(str, fixed))}): the saved resume "
                          "state holds a LoRA of the saved shape. Leave the flag out, or start a new run with "
                          "another --output (or --overwrite).")
    for change in changes:
        log.warning("--resume: %s (allowed by run.allow_changed_on_resume)", change)
    return changes


def _resumed_parameters(saved: JobSpec, training_version: str, training_mode: str | None,
                        request: Mapping[str, Any]) -> TrainingParameters:
    """The saved hyperparameters with the flags given on top, each checked as the contract checks it
    (ranges, types, the warmup rule) in the context of the saved values it depends on."""
    if not request:
        return saved.params
    if training_mode not in (None, "expert"):
        resolve_training_parameters(training_version, training_mode, request)  # the contract's expert-mode refusal
    current = saved.params.to_dict()
    context = {}
    if "lr_warmup_steps" in request and "lr_scheduler" not in request:
        context["lr_scheduler"] = current["lr_scheduler"]  # the warmup null rule follows the saved scheduler
    if "checkpoint_interval" in request and "total_training_steps" not in request:
        context["total_training_steps"] = current["total_training_steps"]
    resolved = resolve_training_parameters(training_version, "expert", {**context, **request}).to_dict()
    merged = {**current, **{name: resolved[name] for name in request}}
    if "lr_scheduler" in request and "lr_warmup_steps" not in request:
        merged["lr_warmup_steps"] = resolved["lr_warmup_steps"]
    if merged["lr_scheduler"] != "constant_with_warmup":
        merged["lr_warmup_steps"] = None
    if merged["checkpoint_interval"] > merged["total_training_steps"]:
        raise InvalidParameterError.single(
            "checkpoint_interval", merged["checkpoint_interval"],
            f"Input should be less than or equal to total_training_steps ({merged['total_training_steps']})")
    return TrainingParameters(**merged)


def _resumed_engine(saved: JobSpec, config: str | None, overrides: list[str], job_file: Path) -> EngineConfig:
    """--config (and --set) when given, else the saved engine config with --set applied on top."""
    if config is not None:
        return load_engine_config(config, overrides)
    raw = copy.deepcopy(saved.engine.to_dict())
    defaults = RunConfig()
    for name in PER_INVOCATION:  # this invocation's own (--set), else the defaults
        key = name.removeprefix("run.")
        raw["run"][key] = copy.deepcopy(getattr(defaults, key))
    return apply_overrides(raw, overrides, f"the saved job {job_file}")


def job_for_resume(output_dir: str, *, base: str | None, dataset: str | None, training_version: str | None,
                   training_mode: str | None, caption_prefix: str | None, version_map: str | None,
                   request: Mapping[str, Any], config: str | None, overrides: list[str],
                   overwrite: bool = False) -> JobSpec | None:
    """The job `train --resume` runs: the saved one, with the given flags checked against it.
    None when OUTPUT holds no saved job (the caller then needs the flags of a fresh run)."""
    saved = load_saved_job(output_dir)
    if saved is None:
        return None
    job_file = Path(output_dir) / JOB_FILE
    version = training_version or saved.training_version
    requested = JobSpec(
        base=base or saved.base, dataset_dir=dataset or saved.dataset_dir, output_dir=output_dir,
        training_version=version, params=_resumed_parameters(saved, version, training_mode, request),
        engine=_resumed_engine(saved, config, overrides, job_file),
        caption_prefix=saved.caption_prefix if caption_prefix is None else caption_prefix,
        resume=True, overwrite=overwrite, version_map=version_map or saved.version_map,
    )
    check_changes(saved, requested, job_file)
    return requested

