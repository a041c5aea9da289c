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
