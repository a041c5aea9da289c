"""Request bodies, and FastAPI's validation errors turned into Bria's 400 shape."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from ..contract import ASPECT_RATIOS
from ..errors import FieldError
from ..inference.generate import MAX_SEED

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
    """Its rules across fields (`rule_errors`) are reported with pydantic's own errors, in one answer."""

    project_name: Name
    project_description: LongText | None = None
    ip_name: Name | None = None
    ip_description: LongText | None = None
    ip_medium: Literal["photography", "illustration"]
    ip_type: Literal["multi_object_set", "object_variants", "icons", "defined_character", "character_variants",
                     "stylized_scene", "other"]
    training_version: VERSIONS | None = Field(default=None, description="locks the project to FIBO or legacy")

    @staticmethod
    def rule_errors(values: dict[str, Any]) -> list[FieldError]:
        """Bria's rules between ip_type, ip_name, ip_description and ip_medium, on the raw fields."""
        ip_type, errors = values.get("ip_type"), []
        if ip_type == "defined_character" and not values.get("ip_name"):
            errors.append(FieldError("ip_name is required when ip_type is defined_character", "ip_name", ""))
        if ip_type in ("defined_character", "object_variants") and not values.get("ip_description"):
            errors.append(FieldError(f"ip_description is required when ip_type is {ip_type}", "ip_description", ""))
        if ip_type in ILLUSTRATION_ONLY and values.get("ip_medium") != "illustration":
            errors.append(FieldError(f"ip_type {ip_type} needs ip_medium illustration", "ip_type", str(ip_type)))
        return errors


def rule_errors_of(route: Any, body: Any) -> list[FieldError]:
    """The cross-field rule errors of a route's body model (a `rule_errors` static method) on the
    raw body: what a 400 adds to pydantic's errors so that every bad field is listed at once."""
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    if not isinstance(body, dict) or not hasattr(model, "rule_errors"):
        return []
    return model.rule_errors(body)


VisualSchema = Annotated[str, Field(max_length=100_000), AfterValidator(_storable)]
VISUAL_SCHEMA_DOC = ("FIBO datasets: a JSON object as a string, the caption values every automatic caption keeps "
                     "(see generate_visual_schema)")


class DatasetCreate(Strict):
    project_id: Id
    name: Name
    training_version: VERSIONS | None = Field(default=None, description="default: the project's training_version, "
                                                                      "or max when the project has none yet")
    caption_prefix: LongText | None = Field(default=None, description="legacy datasets only")
    visual_schema: VisualSchema | None = Field(default=None, description=VISUAL_SCHEMA_DOC)
    upload_type: Literal["basic", "advanced"] = Field(default="basic", description=(
        "basic: images one by one, at most 200; advanced: one zip (images/bulk-upload), at most 5000"))


class DatasetUpdate(Strict):
    name: Name | None = None
    status: Literal["draft", "completed"] | None = None
    caption_prefix: LongText | None = Field(default=None, description="legacy datasets, while draft")
    visual_schema: VisualSchema | None = Field(default=None, description=f"{VISUAL_SCHEMA_DOC}; while draft")


class DatasetClone(Strict):
    name: Name | None = Field(default=None, description='default: "Copy of " and the dataset\'s name')
    description: LongText | None = Field(default=None, description="accepted; datasets here have no description")


class BulkUploadRequest(Strict):
    zip_url: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_storable)] = Field(
        description="an http(s) URL of the zip, or a path on the server inside a folder the operator allows "
                    "(serve --import-root)")
    automatic_captioning: bool | None = Field(default=None, description=(
        "true: every image gets an automatic caption (needs a captioning model on the server), the zip's captions "
        "are ignored; otherwise captions come from the zip (IMAGE.txt next to an image, or metadata.jsonl / "
        "metadata.csv in its folder) and images without one are captioned as single uploads are"))
    content_moderation: bool = Field(default=False, description="accepted; this server moderates nothing")


def _caption_text(value: Any) -> Any:
    # a FIBO caption may be sent as a JSON object as well as a JSON string holding one
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else value


CaptionText = Annotated[str, BeforeValidator(_caption_text), Field(max_length=100_000), AfterValidator(_storable)]


class CaptionUpdate(Strict):
    caption: CaptionText | None = Field(default=None, description="the caption: text, or for FIBO a JSON object (or "
                                                                  "a string holding one)")
    regenerate_caption: bool | None = Field(default=None, description="true: the captioning worker writes a new "
                                                                      "caption (caption_source pending, then "
                                                                      "automatic)")


# ---- captioning (a captioning model on the server: serve --vlm) ---------------------------------

MAX_IMAGE_BYTES = 10 * 2**20
"""the largest image the captioning endpoints take, sent as base64 or fetched from a URL"""
ImageRef = Annotated[str, Field(min_length=1, max_length=(MAX_IMAGE_BYTES * 4) // 3 + 1024,
                                description="a base64-encoded image (optionally a data: URI) or an http(s) URL")]


class VisualSchemaRequest(Strict):
    images: list[ImageRef] = Field(min_length=5, max_length=10, description="5 to 10 images: base64 or http(s) URLs")
    content_moderation: bool = Field(default=False, description="accepted; this server moderates nothing")


class RefineRequest(Strict):
    dataset_id: Id = Field(description="a draft FIBO dataset")
    structured_prompt: Annotated[str, Field(min_length=1, max_length=100_000), AfterValidator(_storable)] = Field(
        description="a visual schema or a caption: a JSON object as a string")
    instruction: Annotated[str, Field(min_length=1, max_length=10_000), AfterValidator(_storable)]
    context_images: list[ImageRef] | None = Field(default=None, max_length=10, description=(
        "accepted; FIBO-VLM's <refine> task reads the JSON and the instruction only"))


class PrefixRequest(Strict):
    image_urls: list[ImageRef] | None = Field(default=None, min_length=1, max_length=6, description="1 to 6 http(s) "
                                              "URLs; either image_urls or images")
    images: list[ImageRef] | None = Field(default=None, min_length=1, max_length=6, description="1 to 6 base64 "
                                          "images")
    ip_type: Literal["stylized_scene", "defined_character", "object_variants"] | None = None
    ip_medium: Literal["photography", "illustration"] | None = None
    ip_name: Name | None = Field(default=None, description="defined_character: the prefix ends with it")
    content_moderation: bool = Field(default=False, description="accepted; this server moderates nothing")
    dataset_id: Id | None = Field(default=None, description="extension: the legacy draft dataset the prefix is for "
                                                            "(checked: a FIBO dataset takes a visual schema instead)")


class ModelCreate(Strict):
    name: Name
    dataset_id: Id
    training_mode: Literal["fully_automated", "expert"] = "fully_automated"
    training_version: VERSIONS | None = Field(default=None, description="the dataset's when omitted")
    description: LongText = ""


class ProjectParameters(Strict):
    project_name: Name
    ip_medium: Literal["photography", "illustration"]
    project_description: LongText | None = None
    ip_type: Literal["multi_object_set", "object_variants", "icons", "defined_character", "character_variants",
                     "stylized_scene", "other"] = "other"


class UploadModelRequest(Strict):
    """POST /models/upload_model: bring your own legacy LoRA (a .safetensors file)."""

    model_url: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_storable)] = Field(
        description="an http(s) URL of the .safetensors LoRA, or a path on the server inside a folder the operator "
                    "allows (serve --import-root)")
    training_version: Literal["bria-3.2", "bria-2.3", "max", "light", "3.2", "2.3"] = Field(
        description="the legacy base the LoRA was trained on (FIBO models cannot be uploaded)")
    model_name: Name | None = Field(default=None, description="default: the file's name")
    project_id: Id | None = Field(default=None, description="the project the model joins; or project_parameters")
    project_parameters: ProjectParameters | None = Field(default=None, description="a new project for the model")
    caption_prefix: LongText | None = Field(default=None, description="the model's generation_prefix")

    @staticmethod
    def rule_errors(values: dict[str, Any]) -> list[FieldError]:
        if (values.get("project_id") is None) == (values.get("project_parameters") is None):
            return [FieldError("send exactly one of project_id and project_parameters", "project_id",
                               str(values.get("project_id") or ""))]
        return []


class ModelUpdate(Strict):
    name: Name | None = None
    description: LongText | None = None
    active_model_version: Annotated[str, Field(pattern=r"^[1-9][0-9]{0,9}$")] | None = Field(
        default=None, description="extension: the checkpoint step generation uses when none is named (a completed "
                                  "expert model's published checkpoint; the final one by default)")


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
        if error.get("type") == "json_invalid":  # its location is a character offset, not a field
            detail = (error.get("ctx") or {}).get("error", "")
            result.append(FieldError(msg=f"the request body is not valid JSON ({detail})".replace(" ()", ""),
                                     field_name="body", field_input=""))
            continue
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


class FailureOut(BaseModel):
    code: str | None
    message: str | None


class ImageOut(BaseModel):
    id: int
    dataset_id: int
    image_name: str
    caption: str | None
    caption_source: Literal["manual", "automatic", "pending", "failed"] | None = Field(description=(
        "pending: the captioning worker will write it; failed: it could not (caption_error says why, the caption "
        "is null); null: no caption and none is coming"))
    caption_error: FailureOut | None = Field(default=None, description="caption_source failed: why")
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
    visual_schema: str | None
    status: Literal["draft", "completed"]
    upload_type: str
    captions_update_status: Literal["empty", "in_progress", "completed"] = Field(description=(
        "in_progress while any caption is pending; completed once none is (failed ones included); empty while no "
        "image has a caption"))
    images_count: int
    created_at: str
    updated_at: str
    images: list[ImageOut] | None = Field(default=None, description="GET /datasets/{id} only")


class FailedImageOut(BaseModel):
    filename: str = Field(description="the image's path inside the zip")
    error_code: str
    error_message: str


class BulkUploadStatusOut(BaseModel):
    dataset_id: int
    status: Literal["pending", "processing", "completed", "failed"]
    progress_percentage: int
    total_processed: int = Field(description="images stored or refused so far")
    total_images: int = Field(description="images in the zip (0 until it has been read)")
    done: int
    failed: int
    failed_images: list[FailedImageOut]
    error: FailureOut | None = Field(description="failed: why the upload as a whole failed (a zip that could not be "
                                                 "fetched, or was refused: unsafe names, links, a zip bomb)")
    created_at: str
    updated_at: str


class TrainingParametersOut(BaseModel):
    """Empty until start_training resolves them."""

    learning_rate: float | None = None
    lr_scheduler: str | None = None
    rank: int | None = None
    total_training_steps: int | None = None
    checkpoint_interval: int | None = None
    lr_warmup_steps: int | None = None


class TrainingProgressOut(BaseModel):
    """Where the training stands, from its metrics file (extension; not in Bria's Model)."""

    phase: Literal["queued"] | None = Field(
        default=None, description="queued: the job waits for a free GPU slice and starts in order")
    queue_position: int | None = Field(default=None, description="queued: 1 for the next job to start")
    current_step: int = Field(description="the last optimizer step done")
    total_steps: int | None
    last_loss: float | None = Field(description="the last finite training loss")
    step_seconds: float | None = Field(description="median seconds per step over the recent steps")
    eta_seconds: float | None = Field(description="time left at the recent pace: 0 once completed, null for a "
                                                  "failed or stopped run")
    updated_at: str | None = Field(description="when the last step was recorded (UTC)")


class ModelOut(BaseModel):
    id: int
    name: str
    description: str
    status: Literal["Created", "InProgress", "Completed", "Failed", "Stopping", "Stopped"]
    dataset_id: int | None = Field(description="null for a model uploaded as a LoRA file")
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
    training_progress: TrainingProgressOut | None = Field(
        default=None, description="GET /models/{id} only, once training has recorded a step or while its job "
                                  "is queued")


class LogOut(BaseModel):
    model_id: int
    lines: list[str] = Field(description="the last lines of the job's train.log, oldest first (empty before the "
                                         "job starts)")


class CheckpointOut(BaseModel):
    checkpoint_step: int
    training_job_id: int
    created_at: str


class SampleOut(BaseModel):
    image_url: str = Field(description="pre-signed, like download_url")
    prompt: str | None = Field(description="the prompt as the pipeline received it")
    seed: int | None


class CheckpointDetailOut(CheckpointOut):
    samples: list[SampleOut] = Field(description="the validation images rendered at this checkpoint (empty when "
                                                 "validation renders are off)")
    samples_grid_url: str | None = Field(description="all samples in one captioned image")


class CheckpointListOut(BaseModel):
    checkpoints: list[CheckpointOut]
    active_model_version: str


class DownloadOut(BaseModel):
    download_url: str
    base_model_name: str
    base_model_card: str | None
    checkpoint_step: int
    expires: int


# ---- generation with a trained model (Bria's /v2 and /v1 endpoints) ------------------------------

AspectRatio = Literal[ASPECT_RATIOS]  # subscripting with the tuple lists each value
Seed = Annotated[int, Field(ge=-1, le=MAX_SEED, description="-1 or omitted: a random seed (returned in the answer)")]
Influence = Annotated[float, Field(ge=0, le=1.5)]
StepsNum = Annotated[int, Field(ge=20, le=50)]


class GenerateTailoredRequest(Strict):
    """POST /v2/image/generate/tailored: a FIBO model."""

    tailored_model_id: Annotated[str, Field(max_length=32)] | Id = Field(description="the model's id")
    tailored_model_influence: Influence = 1.0
    structured_prompt: Annotated[str, Field(max_length=100_000), AfterValidator(_storable)] | None = Field(
        default=None, description="a structured JSON prompt, as a string")
    prompt: LongText | None = Field(default=None, description="plain text: needs a captioning model on the server "
                                                               "to expand it into a structured prompt")
    negative_prompt: LongText | None = None
    guidance_scale: Annotated[int, Field(ge=3, le=5)] = 5
    aspect_ratio: AspectRatio = "1:1"
    steps_num: StepsNum = 50
    seed: Seed | None = None
    sync: bool = False
    prompt_content_moderation: bool = Field(default=True, description="accepted; this server moderates nothing")
    visual_output_content_moderation: bool = Field(default=True, description="accepted; this server moderates "
                                                                             "nothing")


class TextToImageTailoredRequest(Strict):
    """POST /v1/text-to-image/tailored/{model_id}[/{checkpoint_step}]: a legacy model."""

    prompt: Annotated[str, Field(min_length=1, max_length=10_000), AfterValidator(_storable)]
    num_results: Annotated[int, Field(ge=1, le=4)] = 4
    aspect_ratio: AspectRatio = "1:1"
    seed: Seed | None = None
    model_influence: Influence = 1.0
    steps_num: StepsNum | None = Field(default=None, description="the family's default when omitted (Bria 3.2: 30, "
                                                                  "Bria 2.3: 50)")
    negative_prompt: LongText | None = None
    include_generation_prefix: bool = Field(default=True, description="prepend the model's generation_prefix")
    sync: bool = False
    fast: bool | None = Field(default=None, description="accepted; every render here takes steps_num steps")
    content_moderation: bool | None = Field(default=None, description="accepted; this server moderates nothing")


class GenerateTailoredOut(BaseModel):
    image_url: str = Field(description="pre-signed PNG")
    structured_prompt: str = Field(description="the structured prompt the image was rendered from")
    seed: int
    request_id: str


class UrlsOut(BaseModel):
    urls: list[str] = Field(description="pre-signed PNG")
    seed: int


class TextToImageTailoredOut(BaseModel):
    result: list[UrlsOut] = Field(description="one item per image")


class AcceptedOut(BaseModel):
    request_id: str
    status_url: str = Field(description="poll with GET and the api_token header")


class StatusResultOut(BaseModel):
    image_url: str = Field(description="pre-signed PNG (the first when there are several)")
    seed: int
    structured_prompt: str | None = Field(default=None, description="/v2 requests")
    urls: list[str] | None = Field(default=None, description="/v1 requests: every image")


class StatusOut(BaseModel):
    request_id: str
    status: Literal["IN_PROGRESS", "COMPLETED", "FAILED"]
    result: StatusResultOut | None = Field(description="when COMPLETED")
    error: FailureOut | None = Field(description="when FAILED: why")


class VisualSchemaOut(BaseModel):
    visual_schema: str = Field(description="a JSON object as a string: the caption values most of the images share")


class RefineOut(BaseModel):
    structured_prompt: str = Field(description="the refined JSON object, as a compact string")


class PrefixOut(BaseModel):
    prefix: str = Field(description="a caption prefix: set it with PUT /tailored-gen/datasets/{id}")


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
