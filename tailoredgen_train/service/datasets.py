"""Projects, datasets and their images: the rules the API and the console share (both call these;
neither has its own copy). A completed dataset is frozen: it is what training reads."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from PIL import Image as PILImage
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from ..contract import is_fibo
from ..data.captions import normalize_json_caption, normalize_text_caption
from ..data.images import ImageProblem, load_rgb
from ..data.metadata import JSONL_NAME
from ..data.preflight import PreflightReport, validate_dataset
from ..errors import FieldError, InvalidParameterError, NotFoundError, TailoredGenError
from .access import DELETED, Caller
from .captioning import MANUAL, PENDING, captions_uploads, normalize_visual_schema, queue_caption, set_manual_caption
from .core import Service
from .db import BulkUpload, Dataset, Image, Model, Project, utcnow
from .deps import ConflictError
from .runner import ACTIVE
from .schemas import CaptionUpdate, DatasetClone, DatasetCreate, DatasetUpdate, ProjectCreate
from .views import dataset_view, image_view, project_view

MAX_IMAGES = 200  # Bria's limit for a basic dataset
MAX_BULK_IMAGES = 5000  # and for an advanced one (zip uploads)
DEFAULT_VERSION = "max"  # Bria's default training_version for a dataset of a project without one
_COPY_CHUNK = 2**20
MIN_IMAGES_TO_COMPLETE = {"fibo": 5, "legacy": 1}  # Bria: FIBO needs 5 images, legacy 1
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp"}


class ResolutionTooLowError(TailoredGenError):
    code = "resolution_too_low"
    http_status = 412


class UnsupportedImageError(TailoredGenError):
    code = "unsupported_image"
    http_status = 415


class UploadTooLargeError(TailoredGenError):
    code = "upload_too_large"
    http_status = 413


def upload_too_large(max_bytes: int) -> UploadTooLargeError:
    return UploadTooLargeError(f"The upload is larger than this server's limit of {max_bytes / 2**20:g} MiB per image "
                               "(serve --max-upload-mb): send a smaller file.")


class PreflightFailedError(ConflictError):
    """Completing a dataset that fails the training preflight (409); `report` lists every finding."""

    def __init__(self, message: str, report: PreflightReport):
        super().__init__(message)
        self.report = report


def family_kind(training_version: str) -> str:
    return "fibo" if is_fibo(training_version) else "legacy"


def project_or_404(session: Session, project_id: int, caller: Caller) -> Project:
    project = session.get(Project, project_id)
    if project is None or not caller.sees(project):
        raise NotFoundError(f"Project not found: there is no project {project_id}")
    return project


def dataset_or_404(session: Session, dataset_id: int, caller: Caller, *, lock: bool = False) -> Dataset:
    """`lock`: hold the dataset's row until the transaction ends (PostgreSQL's FOR UPDATE; SQLite's
    write transactions are serial already), so that its images, captions and status change one
    writer at a time: an upload cannot slip in between completion's check and its freeze."""
    dataset = session.get(Dataset, dataset_id, with_for_update=lock or None)
    if dataset is None or not caller.sees(dataset):
        raise NotFoundError(f"Dataset not found: there is no dataset {dataset_id}")
    return dataset


def image_or_404(session: Session, dataset_id: int, image_id: int, caller: Caller) -> Image:
    dataset_or_404(session, dataset_id, caller)
    image = session.get(Image, image_id)
    if image is None or image.dataset_id != dataset_id:
        raise NotFoundError(f"Image not found: dataset {dataset_id} has no image {image_id}")
    return image


def require_draft(dataset: Dataset, what: str) -> None:
    """A completed dataset is frozen (409)."""
    if dataset.status != "draft":
        raise ConflictError(f"Cannot {what} in a completed dataset ({dataset.id}): a completed dataset is frozen. "
                            "Create a new dataset to change its images or captions.")


def _caption(raw: str | None, training_version: str) -> str | None:
    if raw is None:
        return None
    try:
        return normalize_json_caption(raw) if is_fibo(training_version) else normalize_text_caption(raw)
    except ValueError as exc:
        hint = " (FIBO captions are structured JSON objects)" if is_fibo(training_version) else ""
        raise InvalidParameterError.single("caption", raw[:200], f"{exc}{hint}") from None


# ---- projects and datasets -----------------------------------------------------------------------


def create_project(service: Service, body: ProjectCreate, caller: Caller) -> dict:
    errors = ProjectCreate.rule_errors(body.model_dump())
    if errors:
        raise InvalidParameterError(errors)
    with service.db.transaction() as session:
        project = Project(**body.model_dump(), org=caller.organization)
        session.add(project)
        session.flush()
        return project_view(project)


def create_dataset(service: Service, body: DatasetCreate, caller: Caller) -> dict:
    """POST /datasets. Without a training_version the dataset takes its project's (max for a project
    that has none yet)."""
    version = body.training_version
    if version is None:
        with service.db.transaction() as session:
            version = project_or_404(session, body.project_id, caller).training_version or DEFAULT_VERSION
    values = {**body.model_dump(), "training_version": version}
    errors = []  # every bad field in one answer
    try:
        service.family_of(version)
    except InvalidParameterError as exc:
        errors += exc.errors
    if body.caption_prefix and is_fibo(version):
        errors.append(FieldError("FIBO datasets take no caption_prefix: their captions are structured JSON",
                                 "caption_prefix", body.caption_prefix[:200]))
    if body.visual_schema is not None:
        try:
            values["visual_schema"] = _visual_schema(body.visual_schema, version)
        except InvalidParameterError as exc:
            errors += exc.errors
    if errors:
        raise InvalidParameterError(errors)
    with service.db.transaction() as session:
        project = project_or_404(session, body.project_id, caller)
        if project.training_version is None:
            project.training_version = version  # the first dataset locks the project's family
        elif family_kind(project.training_version) != family_kind(version):
            raise InvalidParameterError.single(
                "training_version", version,
                f"project {project.id} is locked to {project.training_version!r}: FIBO and legacy versions "
                "(max, light, 3.2, 2.3) cannot share a project")
        dataset = Dataset(**values, org=project.org)
        session.add(dataset)
        session.flush()
        service.dataset_dir(dataset.id).mkdir(parents=True, exist_ok=True)
        return dataset_view(session, dataset)


def update_dataset(service: Service, dataset_id: int, body: DatasetUpdate, caller: Caller) -> dict:
    """PUT /datasets/{id}: rename, a legacy caption_prefix or a FIBO visual_schema while draft, or
    complete (status "completed")."""
    checked = _preflight(service, dataset_id, body, caller) if body.status == "completed" else None
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id, caller, lock=True)
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
            _complete(session, dataset, checked)
        dataset.updated_at = utcnow()
        session.flush()
        return dataset_view(session, dataset)


def _preflight(service: Service, dataset_id: int, body: DatasetUpdate, caller: Caller) -> tuple | None:
    """Before completing: write the draft's metadata.jsonl and check the folder exactly as training will.
    The preflight decodes every image, so it runs outside any transaction (a write transaction would
    hold the database's write lock for all of it); returns what it checked, for `_complete`."""
    with service.db.read() as session:
        dataset = dataset_or_404(session, dataset_id, caller)
        if dataset.status != "draft":
            return None
        images = list(session.scalars(select(Image).where(Image.dataset_id == dataset.id).order_by(Image.id)))
        legacy_prefix = body.caption_prefix is not None and not is_fibo(dataset.training_version)
        prefix = body.caption_prefix if legacy_prefix else dataset.caption_prefix
        checked = _completion_state(images, prefix)
    kind = family_kind(dataset.training_version)
    needed = MIN_IMAGES_TO_COMPLETE[kind]
    if len(images) < needed:
        raise ConflictError(f"Cannot complete dataset {dataset.id}: insufficient images ({len(images)}); a "
                            f"{kind} dataset needs at least {needed}. Upload more with POST "
                            f"/tailored-gen/datasets/{dataset.id}/images.")
    upload = session.get(BulkUpload, dataset.id)
    if upload is not None and upload.status in ("pending", "processing"):
        raise ConflictError(f"Cannot complete dataset {dataset.id} while its bulk upload is {upload.status}: poll "
                            f"GET /tailored-gen/datasets/{dataset.id}/images/bulk-upload/status until it ends.")
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
                              max_pixels=config.max_pixels, caption_prefix=prefix)
    if not report.ok:
        raise PreflightFailedError(f"Cannot complete dataset {dataset.id}: it fails the training preflight:\n"
                                   f"{report.format()}", report)
    return checked


def _complete(session: Session, dataset: Dataset, checked: tuple | None) -> None:
    """Freeze the dataset, if it is still what `_preflight` checked (else 409: send the request again)."""
    images = session.scalars(select(Image).where(Image.dataset_id == dataset.id).order_by(Image.id))
    if checked is None or _completion_state(images, dataset.caption_prefix) != checked:
        raise ConflictError(f"Cannot complete dataset {dataset.id}: its images or captions changed while it was "
                            "being checked; send the request again.")
    dataset.status = "completed"


def _completion_state(images, caption_prefix: str | None) -> tuple:
    """What a completion checks: every image's file and caption, and the caption prefix."""
    return caption_prefix, tuple((i.id, i.file_name, i.caption, i.caption_source) for i in images)


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


# ---- images ----------------------------------------------------------------------------------------


def add_image(service: Service, dataset_id: int, stream: BinaryIO, file_name: str | None, caption: str | None,
              image_name: str | None, caller: Caller) -> dict:
    """POST /datasets/{id}/images: one uploaded file (read from `stream`), checked as training will
    read it, stored under a name the server chooses."""
    with service.db.read() as session:
        require_draft(dataset_or_404(session, dataset_id, caller), "add images")  # before reading the upload
    return store_image(service, dataset_id, stream, image_name or file_name, caption, caller)


def store_image(service: Service, dataset_id: int, stream: BinaryIO, name: str | None, caption: str | None,
                caller: Caller, *, automatic: bool | None = None) -> dict:
    """Check one image (read from `stream`, at most serve --max-upload-mb) as training will read it and
    store it under a name the server chooses: what a single upload and each image of a bulk upload go
    through. `automatic`: queue an automatic caption (None: when the image has no caption and the
    dataset captions uploads)."""
    with service.db.read() as session:
        dataset = dataset_or_404(session, dataset_id, caller)
        require_draft(dataset, "add images")
        version = dataset.training_version
    caption = _caption(caption, version)
    folder = service.dataset_dir(dataset_id)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".upload-{uuid.uuid4().hex}"
    stored: Path | None = None
    try:
        _stage(stream, staging, service.settings.max_upload_bytes)
        # concurrent uploads queue for the decoder's threads: their memory is bounded, not multiplied
        width, height, extension = service.decoder.run(_check_upload, staging, service.engine_config(
            service.family_of(version)).data, service.settings.max_image_pixels)
        name = (name or "image").encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
        with service.db.transaction() as session:
            dataset = dataset_or_404(session, dataset_id, caller, lock=True)
            require_draft(dataset, "add images")  # checked again: the dataset may have been completed meanwhile
            count = session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset_id))
            limit = image_limit(dataset)
            if count >= limit:
                raise ConflictError(f"Dataset {dataset_id} already has the maximum of {limit} images.")
            if automatic is None:
                automatic = not caption and captions_uploads(service.captioning, dataset)
            image = Image(dataset_id=dataset_id, image_name=name[:256], file_name="", caption=None if automatic
                          else caption, caption_source=PENDING if automatic else MANUAL if caption else None,
                          width=width, height=height)
            session.add(image)
            session.flush()
            image.file_name = f"{image.id:08d}{extension}"  # the server names files: no client path reaches disk
            stored = folder / image.file_name
            os.replace(staging, stored)
            service.check_storage()  # the data directory may have gone while the image was checked
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


def image_limit(dataset: Dataset) -> int:
    """Bria's limits: 200 images in a basic dataset, 5000 in an advanced (bulk-uploaded) one."""
    return MAX_BULK_IMAGES if dataset.upload_type == "advanced" else MAX_IMAGES


def _stage(stream: BinaryIO, staging: Path, max_bytes: int) -> None:
    """Copy the uploaded file to `staging` a piece at a time, refusing it (413) once it passes `max_bytes`."""
    written = 0
    with open(staging, "wb") as out:
        while chunk := stream.read(_COPY_CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise upload_too_large(max_bytes)
            out.write(chunk)


def _check_upload(path: Path, data_config, max_image_pixels: int) -> tuple[int, int, str]:
    """(width, height, extension) of an image the engine can train on, or the documented error. The
    pixel count is checked from the header, before anything is decoded."""
    try:
        image = load_rgb(path, max_pixels=min(data_config.max_pixels, max_image_pixels))
        width, height = image.size
        image.close()
        with PILImage.open(path) as raw:
            extension = _EXTENSIONS[raw.format]
    except ImageProblem as exc:
        if exc.reason == "too_many_pixels":
            raise UploadTooLargeError(f"The image has too many pixels: {exc.detail} (serve --max-image-pixels); "
                                      "upload a smaller image.") from None
        raise UnsupportedImageError(f"Unsupported image ({exc.reason}): {exc.detail}. Upload a jpg, png or webp "
                                    "image.") from None
    except (KeyError, OSError):
        raise UnsupportedImageError("Unsupported image: upload a jpg, png or webp image.") from None
    if min(width, height) < data_config.min_side:
        raise ResolutionTooLowError(f"Precondition Failed (resolution too low): the image is {width}x{height}; its "
                                    f"shorter side must be at least {data_config.min_side} pixels.")
    return width, height, extension


def update_caption(service: Service, dataset_id: int, image_id: int, body: CaptionUpdate, caller: Caller) -> dict:
    """PUT /datasets/{id}/images/{image_id}: `caption` sets it by hand; `regenerate_caption: true`
    queues a new automatic caption (the answer says pending; poll the image or the dataset)."""
    if (body.caption is None) == (body.regenerate_caption is None) or body.regenerate_caption is False:
        raise InvalidParameterError.single("caption", body.caption or "", "send exactly one of caption and "
                                           "regenerate_caption: true")
    with service.db.transaction() as session:
        image = image_or_404(session, dataset_id, image_id, caller)
        dataset = dataset_or_404(session, dataset_id, caller, lock=True)
        if body.regenerate_caption:
            service.captioning.require()
            require_draft(dataset, "update captions")
            queue_caption(image)
        else:
            require_draft(dataset, "update captions")
            set_manual_caption(image, _caption(body.caption, dataset.training_version))
        view = image_view(image)
    if body.regenerate_caption:
        service.captioning.wake()
    return view


def delete_image(service: Service, dataset_id: int, image_id: int, caller: Caller) -> None:
    with service.db.transaction() as session:
        image = image_or_404(session, dataset_id, image_id, caller)
        require_draft(dataset_or_404(session, dataset_id, caller, lock=True), "delete an image")
        session.delete(image)
        # a draft's files are not training input yet; the row goes first so a crash leaves no dangling row
        path = service.dataset_dir(dataset_id) / image.file_name
    path.unlink(missing_ok=True)


# ---- deleting and cloning ------------------------------------------------------------------------


def delete_project(service: Service, project_id: int, caller: Caller) -> None:
    """DELETE /projects/{id}: the project, its datasets with their images, and its models (Deleted,
    as DELETE /models/{id} leaves them); 409 while any of its models trains."""
    with service.db.transaction() as session:
        project_or_404(session, project_id, caller)
        if _training(session, Model.project_id == project_id):
            raise ConflictError(f"Cannot delete project while models are in training: stop them first (POST "
                                f"/tailored-gen/models/{{model_id}}/stop_training), then delete project {project_id}.")
        dataset_ids = list(session.scalars(select(Dataset.id).where(Dataset.project_id == project_id,
                                                                    Dataset.status != DELETED)))
        for dataset_id in dataset_ids:
            _delete_dataset_rows(session, session.get(Dataset, dataset_id))
        session.execute(update(Model).where(Model.project_id == project_id, Model.status != "Deleted")
                        .values(status="Deleted", updated_at=utcnow()))
        session.execute(update(Project).where(Project.id == project_id).values(status=DELETED, updated_at=utcnow()))
    for dataset_id in dataset_ids:
        _remove_folder(service, dataset_id)


def delete_dataset(service: Service, dataset_id: int, caller: Caller) -> None:
    """DELETE /datasets/{id}: the dataset and its images; 409 while a model trains on it or its zip
    upload runs. Models already trained on it keep their LoRA files."""
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id, caller, lock=True)  # a start waits, then finds it deleted
        if _training(session, Model.dataset_id == dataset_id):
            raise ConflictError(f"Cannot delete a dataset that is used by a model in training: stop the training "
                                f"first, then delete dataset {dataset_id}.")
        upload = session.get(BulkUpload, dataset_id)
        if upload is not None and upload.status in ("pending", "processing"):
            raise ConflictError(f"Cannot delete dataset {dataset_id} while its bulk upload is {upload.status}: poll "
                                f"GET /tailored-gen/datasets/{dataset_id}/images/bulk-upload/status until it ends.")
        _delete_dataset_rows(session, dataset)
    _remove_folder(service, dataset_id)


def _training(session: Session, condition) -> bool:
    return bool(session.scalar(select(func.count()).select_from(Model).where(condition, Model.status.in_(ACTIVE))))


def _delete_dataset_rows(session: Session, dataset: Dataset) -> None:
    # the row stays (deleted) for the models trained on it; its images go, and no caller sees it again
    session.execute(delete(Image).where(Image.dataset_id == dataset.id))
    dataset.status = DELETED
    dataset.updated_at = utcnow()


def _remove_folder(service: Service, dataset_id: int) -> None:
    """Remove a deleted dataset's folder: renamed first, so that no half-removed folder keeps its name."""
    folder = service.dataset_dir(dataset_id)
    doomed = folder.with_name(f".deleted-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def clone_dataset(service: Service, dataset_id: int, body: DatasetClone, caller: Caller) -> dict:
    """POST /datasets/{id}/clone: a draft copy of a dataset (draft or completed) with its images,
    captions, caption_prefix and visual_schema, named "Copy of NAME" unless `name` is given. The
    images are linked (or copied) into a staging folder that becomes the copy's folder only with
    the transaction that creates its rows."""
    datasets_dir = service.settings.data_dir / "datasets"
    staging = datasets_dir / f".clone-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    created: Path | None = None
    try:
        with service.db.transaction() as session:
            source = dataset_or_404(session, dataset_id, caller)
            copy = Dataset(project_id=source.project_id, org=source.org, name=body.name or f"Copy of {source.name}"[:256],
                           training_version=source.training_version, caption_prefix=source.caption_prefix,
                           visual_schema=source.visual_schema, upload_type=source.upload_type, status="draft")
            session.add(copy)
            session.flush()
            pending = False
            for image in session.scalars(select(Image).where(Image.dataset_id == dataset_id).order_by(Image.id)):
                twin = Image(dataset_id=copy.id, image_name=image.image_name, file_name="", caption=image.caption,
                             caption_source=image.caption_source, caption_error_code=image.caption_error_code,
                             caption_error=image.caption_error, width=image.width, height=image.height)
                session.add(twin)
                session.flush()
                twin.file_name = f"{twin.id:08d}{Path(image.file_name).suffix}"
                _link_or_copy(service.dataset_dir(dataset_id) / image.file_name, staging / twin.file_name)
                pending |= image.caption_source == PENDING
            created = service.dataset_dir(copy.id)
            os.replace(staging, created)
            view = dataset_view(session, copy)
        if pending:  # the copy's pending captions are the worker's to write, like the source's
            service.captioning.wake()
        return view
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    # a stored image is never rewritten in place, so the copy may share its bytes
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
