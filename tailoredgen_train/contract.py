"""The Start Training contract: request fields, defaults by training_version, ranges, the response.

This module is pure: no torch, no I/O. It turns what a client sent into the exact hyperparameters a
job trains with, or into a typed error that names the field and the value given.
The contract and the choices where it is silent: README.md; the API: https://docs.bria.ai/tailored-generation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, Mapping

from .errors import (
    DatasetNotCompletedError,
    ExpertModeRequiredError,
    FieldError,
    IncompatibleDatasetError,
    InvalidParameterError,
    TrainingAlreadyStartedError,
    UnknownTrainingVersionError,
)

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
TRAINING_MODES = ("fully_automated", "expert")
# Bria's generation aspect ratios (W:H), for tailored generation and validation renders
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9")
REQUEST_FIELDS = (
    "lr_scheduler",
    "learning_rate",
    "total_training_steps",
    "rank",
    "checkpoint_interval",
    "lr_warmup_steps",
)

# Every spelling a client may send, mapped to the canonical training_version.
_VERSION_SPELLINGS = {
    "fibo": "fibo",
    "max": "max",
    "light": "light",
    "3.2": "3.2",
    "bria-3.2": "3.2",
    "2.3": "2.3",
    "bria-2.3": "2.3",
}
FIBO_VERSIONS = frozenset({"fibo"})
LEGACY_VERSIONS = frozenset({"max", "light", "3.2", "2.3"})


@dataclass(frozen=True)
class Range:
    low: float
    high: float | None  # None: bounded only by another field (checkpoint_interval <= total steps)


RANGES: dict[str, Range] = {
    "learning_rate": Range(1e-6, 1e-3),
    "total_training_steps": Range(1, 5000),
    "rank": Range(4, 256),
    "checkpoint_interval": Range(100, None),
    "lr_warmup_steps": Range(0, 1000),
}


@dataclass(frozen=True)
class TrainingParameters:
    """The resolved hyperparameters of one training job, exactly as reported to the client."""

    learning_rate: float
    lr_scheduler: str
    rank: int
    total_training_steps: int
    checkpoint_interval: int
    lr_warmup_steps: int | None  # null unless lr_scheduler == "constant_with_warmup"

    @property
    def effective_warmup_steps(self) -> int:
        """Warmup the schedule really uses: the contract makes it relevant only for constant_with_warmup."""
        return self.lr_warmup_steps or 0

    def checkpoint_steps(self) -> list[int]:
        return planned_checkpoint_steps(self.total_training_steps, self.checkpoint_interval)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIBO_DEFAULTS = dict(
    rank=128,
    learning_rate=1e-4,
    lr_scheduler="constant_with_warmup",
    total_training_steps=750,
    checkpoint_interval=500,
    lr_warmup_steps=100,
)
# The legacy table sets no warmup; 100 is the documented schema default and applies when a legacy
# request picks constant_with_warmup without saying how long.
_LEGACY_DEFAULTS = dict(
    rank=128,
    learning_rate=1e-4,
    lr_scheduler="constant",
    total_training_steps=1500,
    checkpoint_interval=500,
    lr_warmup_steps=100,
)


def canonical_version(training_version: str) -> str:
    """'bria-3.2' -> '3.2'; raises UnknownTrainingVersionError listing the accepted spellings."""
    try:
        return _VERSION_SPELLINGS[str(training_version).strip().lower()]
    except KeyError:
        accepted = ", ".join(sorted(_VERSION_SPELLINGS))
        raise UnknownTrainingVersionError(
            f"Unknown training_version {training_version!r}. Use one of: {accepted}."
        ) from None


def is_fibo(training_version: str) -> bool:
    return canonical_version(training_version) in FIBO_VERSIONS


def defaults_for(training_version: str) -> dict[str, Any]:
    return dict(_FIBO_DEFAULTS if is_fibo(training_version) else _LEGACY_DEFAULTS)


def planned_checkpoint_steps(total_training_steps: int, checkpoint_interval: int) -> list[int]:
    """Every interval, plus the final step: (750, 500) -> [500, 750]; (1000, 500) -> [500, 1000]."""
    steps = list(range(checkpoint_interval, total_training_steps + 1, checkpoint_interval))
    if not steps or steps[-1] != total_training_steps:
        steps.append(total_training_steps)
    return steps


def _check_type(name: str, value: Any, errors: list[FieldError]) -> Any:
    """Return the value coerced to the field's type, or record why it cannot be."""
    if name == "lr_scheduler":
        if not isinstance(value, str) or value not in LR_SCHEDULERS:
            errors.append(FieldError(f"Input should be one of {', '.join(LR_SCHEDULERS)}", name, str(value)))
            return None
        return value
    if name == "learning_rate":
        # bool is an int subclass; a JSON true must not pass as 1.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            errors.append(FieldError("Input should be a finite number", name, str(value)))
            return None
        return float(value)
    # integer fields: accept 500 and 500.0, refuse 500.5 and "500"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        errors.append(FieldError("Input should be a valid integer", name, str(value)))
        return None
    return int(value)


def _check_range(name: str, value: float, raw: Any, errors: list[FieldError]) -> None:
    """`raw` is what the client sent: errors echo it, as Bria's field_input does."""
    bounds = RANGES[name]
    if value < bounds.low:
        errors.append(FieldError(f"Input should be greater than or equal to {bounds.low:g}", name, str(raw)))
    elif bounds.high is not None and value > bounds.high:
        errors.append(FieldError(f"Input should be less than or equal to {bounds.high:g}", name, str(raw)))


def resolve_training_parameters(
    training_version: str,
    training_mode: str,
    request: Mapping[str, Any] | None,
) -> TrainingParameters:
    """Apply the contract: the expert-mode rule, types, ranges, defaults and the warmup null rule.

    A field given as null counts as omitted. In fully_automated mode any given field is refused.
    An omitted checkpoint_interval never exceeds the total steps: it is capped to them, so that a
    short run still ends with a checkpoint instead of failing on a value the client never sent.
    """
    defaults = defaults_for(training_version)  # validates the version first
    if training_mode not in TRAINING_MODES:
        raise InvalidParameterError.single(
            "training_mode", training_mode, f"Input should be one of {', '.join(TRAINING_MODES)}"
        )
    request = dict(request or {})
    errors = [
        FieldError(f"Unknown field; accepted fields are {', '.join(REQUEST_FIELDS)}", k, str(request[k]))
        for k in sorted(request) if k not in REQUEST_FIELDS
    ]
    given = {k: v for k, v in request.items() if v is not None and k in REQUEST_FIELDS}
    if given and training_mode != "expert":
        raise ExpertModeRequiredError(sorted(given))

    values: dict[str, Any] = {}
    for name, raw in given.items():
        value = _check_type(name, raw, errors)
        if value is None:
            continue
        if name in RANGES:
            _check_range(name, value, raw, errors)
        values[name] = value

    resolved = {**defaults, **values}
    if "checkpoint_interval" not in values:
        resolved["checkpoint_interval"] = min(resolved["checkpoint_interval"], resolved["total_training_steps"])
    elif "total_training_steps" in resolved and values["checkpoint_interval"] > resolved["total_training_steps"]:
        errors.append(
            FieldError(
                f"Input should be less than or equal to total_training_steps ({resolved['total_training_steps']})",
                "checkpoint_interval",
                str(given["checkpoint_interval"]),
            )
        )
    if errors:
        raise InvalidParameterError(errors)
    if resolved["lr_scheduler"] != "constant_with_warmup":
        resolved["lr_warmup_steps"] = None
    return TrainingParameters(**resolved)


# ---- the Model object and start_training's preconditions -------------------------------------


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat()


@dataclass
class ModelRecord:
    """A Tailored Generation model as the API stores it (Bria's API docs, the Model object)."""

    id: int
    name: str
    dataset_id: int
    project_id: int
    training_version: str
    training_mode: Literal["fully_automated", "expert"] = "fully_automated"
    description: str = ""
    status: str = "Created"
    custom_metadata: str = ""
    active_model_version: str = "default"
    created_at: str = field(default_factory=utcnow_iso)
    updated_at: str = field(default_factory=utcnow_iso)


@dataclass
class DatasetRecord:
    """The part of a dataset that start_training needs; `path` is the folder the engine trains on."""

    id: int
    project_id: int
    status: Literal["draft", "completed"]
    training_version: str
    path: str
    caption_prefix: str | None = None


@dataclass(frozen=True)
class StartTrainingResponse:
    """The 200 body of POST /tailored-gen/models/{model_id}/start_training."""

    id: int
    name: str
    description: str
    status: Literal["InProgress"]
    dataset_id: int
    training_version: str
    training_mode: str
    generation_prefix: str | None
    project_id: int
    created_at: str
    updated_at: str
    custom_metadata: str
    active_model_version: str
    training_parameters: TrainingParameters
    # Published checkpoints, as strings newest first; empty when training has just started.
    checkpoint_steps: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_can_start(model: ModelRecord, dataset: DatasetRecord) -> None:
    """The documented order: 409 (model not Created), 412 (dataset draft), 400 (incompatible)."""
    if model.status != "Created":
        raise TrainingAlreadyStartedError(
            f"Training already started/cannot be resumed: model {model.id} has status {model.status!r}. "
            "Create a new model to train again."
        )
    if dataset.status != "completed":
        raise DatasetNotCompletedError(
            f"Dataset status must be 'completed' to start training: dataset {dataset.id} is "
            f"{dataset.status!r}. Mark it completed (PUT /tailored-gen/datasets/{dataset.id}) first."
        )
    if is_fibo(model.training_version) != is_fibo(dataset.training_version):
        raise IncompatibleDatasetError(
            f"Model {model.id} has training_version {model.training_version!r} but dataset {dataset.id} "
            f"has {dataset.training_version!r}: FIBO models need a fibo dataset, legacy models "
            "(max, light, 3.2, 2.3) a legacy one."
        )


def generation_prefix(training_version: str, caption_prefix: str | None) -> str | None:
    """Bria: null for FIBO models; the dataset's caption_prefix for legacy ones."""
    return None if is_fibo(training_version) else (caption_prefix or "")


def build_response(
    model: ModelRecord, dataset: DatasetRecord, params: TrainingParameters, updated_at: str
) -> StartTrainingResponse:
    return StartTrainingResponse(
        id=model.id,
        name=model.name,
        description=model.description,
        status="InProgress",
        dataset_id=model.dataset_id,
        training_version=model.training_version,
        training_mode=model.training_mode,
        generation_prefix=generation_prefix(model.training_version, dataset.caption_prefix),
        project_id=model.project_id,
        created_at=model.created_at,
        updated_at=updated_at,
        custom_metadata=model.custom_metadata,
        active_model_version=model.active_model_version,
        training_parameters=params,
        checkpoint_steps=[],
    )
