"""Request bodies, and FastAPI's validation errors turned into Bria's 400 shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..errors import FieldError

MAX_ID = 2**63 - 1  # what a database integer column holds
VERSIONS = Literal["fibo", "max", "light", "3.2", "2.3", "bria-3.2", "bria-2.3"]
IP_MEDIUMS = ("photography", "illustration")
IP_TYPES = ("multi_object_set", "object_variants", "icons", "defined_character", "character_variants",
            "stylized_scene", "other")
ILLUSTRATION_ONLY = ("object_variants", "multi_object_set", "icons", "character_variants")


def _storable(text: str) -> str:
    # a lone surrogate cannot be encoded and NUL cannot be stored in PostgreSQL text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    if "\x00" in text:
        raise ValueError("text must not contain NUL characters")
    return text


Text = Annotated[str, AfterValidator(_storable)]
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_storable)]
LongText = Annotated[str, Field(max_length=10_000), AfterValidator(_storable)]
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectCreate(Strict):
    project_name: Name
    project_description: LongText | None = None
    ip_name: Name | None = None
    ip_description: LongText | None = None
    ip_medium: Literal["photography", "illustration"]
    ip_type: Literal["multi_object_set", "object_variants", "icons", "defined_character", "character_variants",
                     "stylized_scene", "other"]
    training_version: VERSIONS | None = Field(default=None, description="locks the project to FIBO or legacy")


class DatasetCreate(Strict):
    project_id: Id
    name: Name
    training_version: VERSIONS = "max"
    caption_prefix: LongText | None = Field(default=None, description="legacy datasets only")
    upload_type: Literal["basic"] = "basic"


class DatasetUpdate(Strict):
    name: Name | None = None
    status: Literal["draft", "completed"] | None = None
    caption_prefix: LongText | None = Field(default=None, description="legacy datasets, while draft")


class CaptionUpdate(Strict):
    caption: Annotated[str, Field(max_length=100_000), AfterValidator(_storable)] | None = None
    regenerate_caption: bool | None = None


class ModelCreate(Strict):
    name: Name
    dataset_id: Id
    training_mode: Literal["fully_automated", "expert"] = "fully_automated"
    training_version: VERSIONS | None = Field(default=None, description="the dataset's when omitted")
    description: LongText = ""


class ModelUpdate(Strict):
    name: Name | None = None
    description: LongText | None = None


class StartTrainingRequest(Strict):
    """Documentation of start_training's body; the handler reads the raw JSON, so that the contract's
    own resolution (expert-mode rule, ranges, defaults) decides, exactly as in the engine."""

    lr_scheduler: Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                          "constant_with_warmup"] | None = None
    learning_rate: Annotated[float, Field(ge=1e-6, le=1e-3)] | None = None
    total_training_steps: Annotated[int, Field(ge=1, le=5000)] | None = None
    rank: Annotated[int, Field(ge=4, le=256)] | None = None
    checkpoint_interval: Annotated[int, Field(ge=100)] | None = None
    lr_warmup_steps: Annotated[int, Field(ge=0, le=1000)] | None = None


def field_errors(validation_errors: list[dict[str, Any]]) -> list[FieldError]:
    """pydantic's errors as Bria's {msg, field_name, field_input} items."""
    result = []
    for error in validation_errors:
        location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
        name = ".".join(location) or "body"
        raw = error.get("input")
        value = "" if raw is None or isinstance(raw, (dict, list)) and error.get("type") == "missing" else raw
        result.append(FieldError(msg=str(error.get("msg", "invalid value")), field_name=name,
                                 field_input=_printable(value)))
    return result


def _printable(value: Any) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= 200 else text[:200] + "..."


# ---- response bodies (what /openapi.json promises; the handlers build them in views.py) -------


class ProjectOut(BaseModel):
    id: int
    project_name: str
    project_description: str | None
    ip_name: str | None
    ip_description: str | None
    ip_medium: str
    ip_type: str
    training_version: str | None
    status: str
    created_at: str
    updated_at: str


class ImageOut(BaseModel):
    id: int
    dataset_id: int
    image_name: str
    caption: str | None
    caption_source: Literal["manual", "pending"]
    width: int
    height: int
    created_at: str
    updated_at: str


class DatasetOut(BaseModel):
    id: int
    project_id: int
    name: str
    training_version: str
    caption_prefix: str | None
    status: Literal["draft", "completed"]
    upload_type: str
    captions_update_status: str
    images_count: int
    created_at: str
    updated_at: str
    images: list[ImageOut] | None = Field(default=None, description="GET /datasets/{id} only")


class TrainingParametersOut(BaseModel):
    """Empty until start_training resolves them."""

    learning_rate: float | None = None
    lr_scheduler: str | None = None
    rank: int | None = None
    total_training_steps: int | None = None
    checkpoint_interval: int | None = None
    lr_warmup_steps: int | None = None


class FailureOut(BaseModel):
    code: str | None
    message: str | None


class ModelOut(BaseModel):
    id: int
    name: str
    description: str
    status: Literal["Created", "InProgress", "Completed", "Failed", "Stopping", "Stopped"]
    dataset_id: int
    training_version: str
    training_mode: Literal["fully_automated", "expert"]
    generation_prefix: str | None
    project_id: int
    created_at: str
    updated_at: str
    custom_metadata: str
    active_model_version: str
    training_parameters: TrainingParametersOut | None = Field(
        default=None, description="omitted by GET /models unless include_training_parameters=true")
    checkpoint_steps: list[str] | None = Field(default=None, description="newest first; expert models only")
    error: FailureOut | None = Field(default=None, description="Failed models: the engine's error code and message")


class CheckpointOut(BaseModel):
    checkpoint_step: int
    training_job_id: int
    created_at: str


class CheckpointListOut(BaseModel):
    checkpoints: list[CheckpointOut]
    active_model_version: str


class DownloadOut(BaseModel):
    download_url: str
    base_model_name: str
    base_model_card: str | None
    checkpoint_step: int
    expires: int


class FieldErrorOut(BaseModel):
    msg: str
    field_name: str
    field_input: str


class FieldErrorsOut(BaseModel):
    errors: list[FieldErrorOut]


class MessageOut(BaseModel):
    message: str
    code: str | None = None
    request_id: str | None = Field(default=None, description="500 only: the id of the log line with the details")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": FieldErrorsOut | MessageOut, "description": "invalid fields, or a request wrong as a whole"},
    401: {"model": MessageOut, "description": "missing or wrong api_token"},
    404: {"model": MessageOut, "description": "not found"},
    409: {"model": MessageOut, "description": "conflicts with the resource's state"},
    412: {"model": MessageOut, "description": "the dataset is not completed, or an image's resolution is too low"},
    413: {"model": MessageOut, "description": "the upload is too large"},
    415: {"model": MessageOut, "description": "not a jpg, png or webp image the engine can decode"},
    429: {"model": MessageOut, "description": "over the token's request rate or training cap (Retry-After)"},
    500: {"model": MessageOut, "description": "internal error: only a request id"},
}
