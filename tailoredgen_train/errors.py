"""Typed errors with stable codes.

Every failure a user can cause is one of these. `code` never changes once released, so that
callers (the HTTP layer, the orchestration API, scripts) can branch on it; `http_status` is the
status the Tailored Generation API documents for that situation.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterable


class TailoredGenError(Exception):
    """Base class. `message` is written for the person who has to fix the problem."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class FieldError:
    """One bad request field, in the shape Bria's 400 body uses."""

    msg: str
    field_name: str
    field_input: str


class InvalidParameterError(TailoredGenError):
    """One or more request fields are out of range or of the wrong type (400)."""

    code = "invalid_parameter"
    http_status = 400
    subject: ClassVar[str] = "training parameter"

    def __init__(self, errors: list[FieldError]):
        assert errors, "InvalidParameterError needs at least one FieldError"
        self.errors = list(errors)
        text = "; ".join(f"{e.field_name}={e.field_input}: {e.msg}" for e in self.errors)
        super().__init__(f"Invalid {self.subject}(s): {text}")

    @classmethod
    def single(cls, field_name: str, value: Any, msg: str) -> InvalidParameterError:
        return cls([FieldError(msg=msg, field_name=field_name, field_input=str(value))])

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "errors": [asdict(e) for e in self.errors]}


class InvalidGenerationParameterError(InvalidParameterError):
    """A generation setting is out of range (400): the same code and body as any bad field."""

    subject = "generation parameter"


class PromptError(TailoredGenError):
    """A FIBO prompt that is not a structured JSON object (400)."""

    code = "structured_prompt_required"
    http_status = 400


class LoraFileError(TailoredGenError):
    """A LoRA file that is missing, unreadable, or not made for the base it is loaded into (400)."""

    code = "lora_invalid"
    http_status = 400


class ExpertModeRequiredError(TailoredGenError):
    """Advanced parameters were sent for a model that is not in expert mode (400)."""

    code = "expert_mode_required"
    http_status = 400

    def __init__(self, fields: list[str]):
        self.fields = list(fields)
        super().__init__(
            "Advanced training parameters are only supported when training_mode is set to 'expert'. "
            f"Got {', '.join(self.fields)} for a model in fully_automated mode: create the model with "
            "training_mode='expert', or omit these fields to use the defaults."
        )


class UnknownTrainingVersionError(TailoredGenError):
    code = "unknown_training_version"
    http_status = 400


class IncompatibleDatasetError(TailoredGenError):
    """A FIBO model with a legacy dataset or the other way round (400)."""

    code = "incompatible_dataset"
    http_status = 400


class NotARunFolderError(TailoredGenError):
    """A folder given as a run's output folder holds no job.json (400)."""

    code = "not_a_run_folder"
    http_status = 400


class UnauthorizedError(TailoredGenError):
    code = "unauthorized"
    http_status = 401


class ForbiddenError(TailoredGenError):
    code = "forbidden"
    http_status = 403


class NotFoundError(TailoredGenError):
    code = "not_found"
    http_status = 404


class TrainingAlreadyStartedError(TailoredGenError):
    """start_training on a model whose status is not Created (409)."""

    code = "training_already_started"
    http_status = 409


class DatasetNotCompletedError(TailoredGenError):
    """The dataset is still a draft (412)."""

    code = "dataset_not_completed"
    http_status = 412


class DatasetInvalidError(TailoredGenError):
    """Preflight found bad files; `problems` lists every one of them (412)."""

    code = "dataset_invalid"
    http_status = 412

    def __init__(self, message: str, problems: list[Any] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "problems": [p.to_dict() if hasattr(p, "to_dict") else p for p in self.problems],
        }


class RateLimitedError(TailoredGenError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ConfigError(TailoredGenError):
    """An engine config file or engineering option is wrong (an operator's mistake)."""

    code = "invalid_config"
    http_status = 500


class BaseModelError(TailoredGenError):
    """The base model directory or hub id cannot be loaded as the family expects."""

    code = "base_model_invalid"
    http_status = 500


class OutputDirError(TailoredGenError):
    """The run folder cannot be created or written (a file in its place, no permission)."""

    code = "output_dir_invalid"
    http_status = 500


class OutputInUseError(TailoredGenError):
    """Another training holds the run folder's lock (OUTPUT/train.lock) (409)."""

    code = "output_in_use"
    http_status = 409


class ResumeError(TailoredGenError):
    """A checkpoint cannot be resumed (missing, corrupt, or made for another setup) (409)."""

    code = "cannot_resume"
    http_status = 409


class NonFiniteLossError(TailoredGenError):
    code = "non_finite_loss"
    http_status = 500


class OutOfMemoryError(TailoredGenError):
    """The accelerator (or host) ran out of memory during a step; the last checkpoint is intact."""

    code = "oom"
    http_status = 500


class CheckpointWriteError(TailoredGenError):
    """A checkpoint could not be written (disk full, I/O error); the previous one stays valid."""

    code = "checkpoint_write_failed"
    http_status = 500


class ReportWriteError(TailoredGenError):
    """OUTPUT/report.html could not be written (permissions, disk full); training is not affected."""

    code = "report_write_failed"
    http_status = 500


class Preempted(TailoredGenError):
    """SIGTERM/SIGINT stopped the run at a step boundary after saving resume state."""

    code = "preempted"
    http_status = 503

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT, as shells report them


class CaptionFailedError(TailoredGenError):
    """The VLM did not produce a usable caption or JSON prompt, even after a retry at another seed.
    `raw` is what it wrote on the last attempt."""

    code = "caption_failed"
    http_status = 500

    def __init__(self, message: str, raw: str | None = None):
        super().__init__(message)
        self.raw = raw

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "raw": self.raw}


class VlmInvalidError(TailoredGenError):
    """--vlm names something that cannot be loaded as a Qwen3-VL captioner (an operator's mistake)."""

    code = "vlm_invalid"
    http_status = 500


class CaptionInputError(TailoredGenError):
    """A captioning request the user can fix: an empty prompt, a JSON prompt that is not an object,
    a visual schema with the wrong number of images or with fields FIBO does not have (400)."""

    code = "invalid_caption_input"
    http_status = 400


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """" (did you mean X?)" for the closest candidate to a misspelt name, or "" when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
