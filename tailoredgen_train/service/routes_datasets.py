"""Projects, datasets and their images. A completed dataset is frozen: it is what training reads."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..contract import is_fibo
from ..data.captions import normalize_json_caption, normalize_text_caption
from ..data.images import ImageProblem, load_rgb
from ..data.metadata import JSONL_NAME
from ..data.preflight import validate_dataset
from ..errors import InvalidParameterError, NotFoundError, TailoredGenError
from .captioning import (MANUAL, PENDING, captions_uploads, normalize_visual_schema, regenerate_caption,
                         set_manual_caption)
from .db import Dataset, Image, Project, utcnow
from .deps import (ConflictError, UnsupportedImageError, UploadTooLargeError, dataset_or_404, image_or_404,
                   require_draft, service_of)
from .schemas import (ERROR_RESPONSES, ILLUSTRATION_ONLY, MAX_ID, CaptionUpdate, DatasetCreate, DatasetOut,
                      DatasetUpdate, ImageOut, ProjectCreate, ProjectOut)
from .views import dataset_view, image_view, project_view

router = APIRouter(tags=["projects and datasets"], responses=ERROR_RESPONSES)
ProjectId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
DatasetId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]

MAX_IMAGES = 200  # Bria's limit for a basic dataset
MAX_UPLOAD_BYTES = 64 * 2**20
MIN_IMAGES_TO_COMPLETE = {"fibo": 5, "legacy": 1}  # Bria: FIBO needs 5 images, legacy 1
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}


class ResolutionTooLowError(TailoredGenError):
    code = "resolution_too_low"
    http_status = 412


def _family_kind(training_version: str) -> str:
    return "fibo" if is_fibo(training_version) else "legacy"


def _project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise NotFoundError(f"Project not found: there is no project {project_id}")
    return project


def _caption(raw: str | None, training_version: str) -> str | None:
    if raw is None:
        return None
    try:
        return normalize_json_caption(raw) if is_fibo(training_version) else normalize_text_caption(raw)
    except ValueError as exc:
        hint = " (FIBO captions are structured JSON objects)" if is_fibo(training_version) else ""
        raise InvalidParameterError.single("caption", raw[:200], f"{exc}{hint}") from None


# ---- projects ----------------------------------------------------------------------------------


@router.post("/projects", status_code=201, response_model=ProjectOut)
def create_project(body: ProjectCreate, request: Request) -> dict:
    if body.ip_type == "defined_character" and not body.ip_name:
        raise InvalidParameterError.single("ip_name", "", "ip_name is required when ip_type is defined_character")
    if body.ip_type in ("defined_character", "object_variants") and not body.ip_description:
        raise InvalidParameterError.single("ip_description", "",
                                           f"ip_description is required when ip_type is {body.ip_type}")
    if body.ip_type in ILLUSTRATION_ONLY and body.ip_medium != "illustration":
        raise InvalidParameterError.single("ip_type", body.ip_type,
                                           f"ip_type {body.ip_type} needs ip_medium illustration")
    with service_of(request).db.transaction() as session:
        project = Project(**body.model_dump())
        session.add(project)
        session.flush()
        return project_view(project)


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(request: Request) -> list[dict]:
    with service_of(request).db.transaction() as session:
        return [project_view(p) for p in session.scalars(select(Project).order_by(Project.id))]


@router.get("/projects/{project_id}", response_model=ProjectOut)
def get_project(project_id: ProjectId, request: Request) -> dict:
    with service_of(request).db.transaction() as session:
        return project_view(_project(session, project_id))


# ---- datasets ----------------------------------------------------------------------------------


@router.post("/datasets", status_code=201, response_model=DatasetOut, response_model_exclude_unset=True)
def create_dataset(body: DatasetCreate, request: Request) -> dict:
    service = service_of(request)
    service.family_of(body.training_version)
    if body.caption_prefix and is_fibo(body.training_version):
        raise InvalidParameterError.single("caption_prefix", body.caption_prefix,
                                           "FIBO datasets take no caption_prefix: their captions are structured JSON")
    values = body.model_dump()
    if body.visual_schema is not None:
        values["visual_schema"] = _visual_schema(body.visual_schema, body.training_version)
    with service.db.transaction() as session:
        project = _project(session, body.project_id)
        if project.training_version is None:
            project.training_version = body.training_version  # the first dataset locks the project's family
        elif _family_kind(project.training_version) != _family_kind(body.training_version):
            raise InvalidParameterError.single(
                "training_version", body.training_version,
                f"project {project.id} is locked to {project.training_version!r}: FIBO and legacy versions "
                "(max, light, 3.2, 2.3) cannot share a project")
        dataset = Dataset(**values)
        session.add(dataset)
        session.flush()
        service.dataset_dir(dataset.id).mkdir(parents=True, exist_ok=True)
        return dataset_view(session, dataset)


@router.get("/datasets", response_model=list[DatasetOut], response_model_exclude_unset=True)
def list_datasets(request: Request) -> list[dict]:
    with service_of(request).db.transaction() as session:
        return [dataset_view(session, d) for d in session.scalars(select(Dataset).order_by(Dataset.id))]


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, response_model_exclude_unset=True)
def get_dataset(dataset_id: DatasetId, request: Request,
                max_images: Annotated[int, Query(ge=1, le=MAX_IMAGES)] = MAX_IMAGES) -> dict:
    with service_of(request).db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id)
        images = list(session.scalars(select(Image).where(Image.dataset_id == dataset_id)
                                      .order_by(Image.id).limit(max_images)))
        return dataset_view(session, dataset, images=images)


@router.put("/datasets/{dataset_id}", response_model=DatasetOut, response_model_exclude_unset=True)
def update_dataset(dataset_id: DatasetId, body: DatasetUpdate, request: Request) -> dict:
    service = service_of(request)
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id)
        if body.caption_prefix is not None:
            if is_fibo(dataset.training_version):
                raise InvalidParameterError.single("caption_prefix", body.caption_prefix,
                                                   "FIBO datasets take no caption_prefix")
            require_draft(dataset, "change the caption_prefix")
            dataset.caption_prefix = body.caption_prefix
        if body.visual_schema is not None:
            schema = _visual_schema(body.visual_schema, dataset.training_version)
            require_draft(dataset, "change the visual_schema")
            dataset.visual_schema = schema
        if body.status == "draft" and dataset.status == "completed":
            raise ConflictError(f"Dataset {dataset_id} is completed and cannot go back to draft: create a new dataset.")
        if body.name is not None:
            dataset.name = body.name
        if body.status == "completed" and dataset.status == "draft":
            _complete(service, session, dataset)
        dataset.updated_at = utcnow()
        session.flush()
        return dataset_view(session, dataset)


def _complete(service, session: Session, dataset: Dataset) -> None:
    """Freeze the dataset: write its metadata.jsonl and check the folder exactly as training will."""
    images = list(session.scalars(select(Image).where(Image.dataset_id == dataset.id).order_by(Image.id)))
    kind = _family_kind(dataset.training_version)
    needed = MIN_IMAGES_TO_COMPLETE[kind]
    if len(images) < needed:
        raise ConflictError(f"Cannot complete dataset {dataset.id}: insufficient images ({len(images)}); a "
                            f"{kind} dataset needs at least {needed}. Upload more with POST "
                            f"/tailored-gen/datasets/{dataset.id}/images.")
    pending = sum(i.caption_source == PENDING for i in images)
    if pending:
        raise ConflictError(f"Cannot complete dataset {dataset.id}: {pending} caption(s) are still pending; poll GET "
                            f"/tailored-gen/datasets/{dataset.id} until captions_update_status is completed.")
    missing = [i.id for i in images if not i.caption]
    if missing:
        raise ConflictError(f"Cannot complete dataset {dataset.id}: images {missing} have no caption; set one with "
                            f"PUT /tailored-gen/datasets/{dataset.id}/images/{{image_id}} (caption, or "
                            "regenerate_caption: true).")
    folder = service.dataset_dir(dataset.id)
    lines = "".join(json.dumps({"file_name": i.file_name, "caption": i.caption}) + "\n" for i in images)
    _write_atomically(folder / JSONL_NAME, lines)
    config = service.engine_config(service.family_of(dataset.training_version)).data
    report = validate_dataset(folder, caption_format="json" if kind == "fibo" else "text", min_side=config.min_side,
                              max_pixels=config.max_pixels, caption_prefix=dataset.caption_prefix)
    if not report.ok:
        raise ConflictError(f"Cannot complete dataset {dataset.id}: it fails the training preflight:\n"
                            f"{report.format()}")
    dataset.status = "completed"


def _visual_schema(text: str, training_version: str) -> str:
    if not is_fibo(training_version):
        raise InvalidParameterError.single("visual_schema", text[:200], "legacy datasets take no visual_schema: "
                                           "their captions are plain text that continues the caption_prefix")
    return normalize_visual_schema(text)


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


# ---- images ------------------------------------------------------------------------------------


@router.post("/datasets/{dataset_id}/images", status_code=201, response_model=ImageOut)
def upload_image(dataset_id: DatasetId, request: Request, file: Annotated[UploadFile, File()],
                 caption: Annotated[str | None, Form(max_length=100_000)] = None,
                 image_name: Annotated[str | None, Form(max_length=256)] = None) -> dict:
    service = service_of(request)
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id)
        require_draft(dataset, "add images")
        version = dataset.training_version
    caption = _caption(caption, version)
    data = file.file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadTooLargeError(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    folder = service.dataset_dir(dataset_id)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".upload-{uuid.uuid4().hex}"
    staging.write_bytes(data)
    stored: Path | None = None
    try:
        width, height, extension = _check_upload(staging, service.engine_config(service.family_of(version)).data)
        name = (image_name or file.filename or "image").encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
        with service.db.transaction() as session:
            dataset = dataset_or_404(session, dataset_id)
            require_draft(dataset, "add images")  # checked again: the dataset may have been completed meanwhile
            count = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset_id))
            if count >= MAX_IMAGES:
                raise ConflictError(f"Dataset {dataset_id} already has the maximum of {MAX_IMAGES} images.")
            automatic = not caption and captions_uploads(service, dataset)
            image = Image(dataset_id=dataset_id, image_name=name[:256], file_name="", caption=caption,
                          caption_source=MANUAL if caption else PENDING if automatic else None, width=width,
                          height=height)
            session.add(image)
            session.flush()
            image.file_name = f"{image.id:08d}{extension}"  # the server names files: no client path reaches disk
            stored = folder / image.file_name
            os.replace(staging, stored)
            view = image_view(image)
        if automatic:
            service.captioning.wake()
        return view
    except BaseException:
        # a file without its committed row would fail the preflight when the dataset is completed
        if stored is not None:
            stored.unlink(missing_ok=True)
        raise
    finally:
        staging.unlink(missing_ok=True)


def _check_upload(path: Path, data_config) -> tuple[int, int, str]:
    """(width, height, extension) of an image the engine can train on, or the documented error."""
    try:
        image = load_rgb(path, max_pixels=data_config.max_pixels)
        width, height = image.size
        image.close()
        with PILImage.open(path) as raw:
            extension = _EXTENSIONS[raw.format]
    except ImageProblem as exc:
        if exc.reason == "too_many_pixels":
            raise UploadTooLargeError(f"the image has too many pixels: {exc.detail}") from None
        raise UnsupportedImageError(f"Unsupported image ({exc.reason}): {exc.detail}. Upload a jpg, png or webp "
                                    "image.") from None
    except (KeyError, OSError):
        raise UnsupportedImageError("Unsupported image: upload a jpg, png or webp image.") from None
    if min(width, height) < data_config.min_side:
        raise ResolutionTooLowError(f"Precondition Failed (resolution too low): the image is {width}x{height}; its "
                                    f"shorter side must be at least {data_config.min_side} pixels.")
    return width, height, extension


@router.get("/datasets/{dataset_id}/images", response_model=list[ImageOut])
def list_images(dataset_id: DatasetId, request: Request) -> list[dict]:
    with service_of(request).db.transaction() as session:
        dataset_or_404(session, dataset_id)
        return [image_view(i) for i in session.scalars(select(Image).where(Image.dataset_id == dataset_id)
                                                        .order_by(Image.id))]


@router.get("/datasets/{dataset_id}/images/{image_id}", response_model=ImageOut)
def get_image(dataset_id: DatasetId, image_id: ImageId, request: Request) -> dict:
    with service_of(request).db.transaction() as session:
        return image_view(image_or_404(session, dataset_id, image_id))


@router.put("/datasets/{dataset_id}/images/{image_id}", response_model=ImageOut)
def update_caption(dataset_id: DatasetId, image_id: ImageId, body: CaptionUpdate, request: Request) -> dict:
    """`caption` sets it by hand; `regenerate_caption: true` queues a new automatic caption (the
    answer says pending; poll the image or the dataset)."""
    if (body.caption is None) == (body.regenerate_caption is None) or body.regenerate_caption is False:
        raise InvalidParameterError.single("caption", body.caption or "", "send exactly one of caption and "
                                           "regenerate_caption: true")
    service = service_of(request)
    if body.regenerate_caption:
        return regenerate_caption(service, dataset_id, image_id)
    with service.db.transaction() as session:
        image = image_or_404(session, dataset_id, image_id)
        dataset = dataset_or_404(session, dataset_id)
        require_draft(dataset, "update captions")
        set_manual_caption(image, _caption(body.caption, dataset.training_version))
        return image_view(image)


@router.delete("/datasets/{dataset_id}/images/{image_id}", status_code=204)
def delete_image(dataset_id: DatasetId, image_id: ImageId, request: Request) -> Response:
    service = service_of(request)
    with service.db.transaction() as session:
        image = image_or_404(session, dataset_id, image_id)
        require_draft(dataset_or_404(session, dataset_id), "delete an image")
        session.delete(image)
        # a draft's files are not training input yet; the row goes first so a crash leaves no dangling row
        path = service.dataset_dir(dataset_id) / image.file_name
    path.unlink(missing_ok=True)
    return Response(status_code=204)
