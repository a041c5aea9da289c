"""Models and their training: the rules the API and the console share (create, start, stop)."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from .. import strict_json
from ..contract import DatasetRecord, ModelRecord, canonical_version, check_can_start, generation_prefix, is_fibo
from ..engine.checkpoint import LORA_FILE
from ..engine.run_log import LOG_FILE
from ..errors import FieldError, InvalidParameterError, LoraFileError, NotFoundError, TailoredGenError
from ..recipe import JobSpec
from ..report.metrics import tail_lines
from ..start import start_training
from .access import Caller
from .core import Service
from .datasets import dataset_or_404, project_or_404
from .db import Checkpoint, Dataset, Model, Project, TrainingJob, utcnow
from .deps import FILES_PREFIX, BadRequestError, ConflictError, model_or_404, signed_url
from .imports import fetch, resolve_source
from .schemas import ModelCreate, UploadModelRequest
from .views import UPLOADED_STEP, base_model_view, final_step, model_view

MAX_LOG_LINES = 2000
_LOG_BYTES_PER_LINE = 1024  # what a tail read allows per requested line (long lines are cut at the start)


def create_model(service: Service, body: ModelCreate, caller: Caller) -> dict:
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, body.dataset_id, caller)
        version = body.training_version or dataset.training_version
        if is_fibo(version) != is_fibo(dataset.training_version):
            raise InvalidParameterError.single(
                "training_version", version, f"dataset {dataset.id} is a {dataset.training_version!r} dataset: FIBO "
                "models need a fibo dataset, legacy models (max, light, 3.2, 2.3) a legacy one")
        service.family_of(version)
        model = Model(name=body.name, description=body.description, dataset_id=dataset.id,
                      project_id=dataset.project_id, org=dataset.org, training_version=version,
                      training_mode=body.training_mode, training_parameters={})
        session.add(model)
        session.flush()
        return model_view(session, model)


class _ClaimThenSubmit:
    """start_training's launcher here: the atomic claim, then the backend."""

    def __init__(self, service: Service, model_id: int, owner: str, prefix: str | None):
        self.service, self.model_id, self.owner, self.prefix = service, model_id, owner, prefix

    def launch(self, job: JobSpec) -> None:
        self.service.runner.claim(self.model_id, self.owner, job.params.to_dict(), self.prefix)
        self.service.runner.submit(self.model_id, job)


def _parse_body(raw: bytes) -> dict[str, Any]:
    """start_training's raw JSON body; an empty body takes every default."""
    if not raw.strip():
        return {}
    try:
        body = strict_json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameterError([FieldError("the request body is not valid JSON", "body",
                                                raw[:200].decode("utf-8", "replace"))]) from None
    if not isinstance(body, dict):
        raise InvalidParameterError([FieldError("the request body must be a JSON object", "body", str(body)[:200])])
    return body


def start_model(service: Service, model_id: int, request: bytes | Mapping[str, Any], caller: Caller) -> dict:
    """POST /models/{id}/start_training: `request` is the raw body (bytes) or the fields already parsed.
    Errors in the documented order: 404, 409, 412, then the body's 400."""
    with service.db.transaction() as session:
        model = model_or_404(session, model_id, caller)
        if model.dataset_id is None:
            raise ConflictError(f"Training already started/cannot be resumed: model {model_id} was uploaded as a LoRA "
                                "file; create a model on a dataset to train one.")
        dataset = session.get(Dataset, model.dataset_id)
        model_record = ModelRecord(
            id=model.id, name=model.name, dataset_id=model.dataset_id, project_id=model.project_id,
            training_version=model.training_version, training_mode=model.training_mode,
            description=model.description, status=model.status, custom_metadata=model.custom_metadata,
            active_model_version=model.active_model_version, created_at=model.created_at, updated_at=model.updated_at)
        dataset_record = DatasetRecord(id=dataset.id, project_id=dataset.project_id, status=dataset.status,
                                       training_version=dataset.training_version,
                                       path=str(service.dataset_dir(dataset.id)), caption_prefix=dataset.caption_prefix)
    check_can_start(model_record, dataset_record)  # 409 and 412 come before any complaint about the body
    fields = _parse_body(request) if isinstance(request, bytes) else dict(request)
    family = service.family_of(model.training_version)
    launcher = _ClaimThenSubmit(service, model_id, caller.token_id,
                                generation_prefix(model.training_version, dataset.caption_prefix))
    response = start_training(model_record, dataset_record, fields, base=service.settings.bases[family],
                              output_dir=service.runner.run_dir(model_id), engine=service.engine_config(family),
                              launcher=launcher, version_map=service.settings.version_map)
    return response.to_dict()


def stop_model(service: Service, model_id: int, caller: Caller) -> dict:
    """InProgress -> Stopping; the model becomes Stopped when its job has exited. It cannot be resumed."""
    with service.db.transaction() as session:
        model_or_404(session, model_id, caller)
    if not service.runner.request_stop(model_id):
        raise ConflictError(f"Training already stopped/not in training: model {model_id} is not InProgress.")
    with service.db.transaction() as session:
        return model_view(session, model_or_404(session, model_id, caller))


# ---- checkpoints and download ------------------------------------------------------------------


def expert_model(session: Session, model_id: int, caller: Caller) -> Model:
    model = model_or_404(session, model_id, caller)
    if model.training_mode != "expert":
        raise BadRequestError(f"Checkpoints are only available for models trained in expert mode; model {model_id} "
                              "is fully_automated.")
    return model


def checkpoint_or_404(session: Session, model_id: int, step: int) -> Checkpoint:
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.model_id == model_id, Checkpoint.step == step))
    if checkpoint is None:
        raise NotFoundError(f"Checkpoint not found: model {model_id} has no checkpoint at step {step}")
    return checkpoint


def download_link(service: Service, request: Request, model_id: int, checkpoint_step: int | None,
                  caller: Caller) -> dict:
    """GET /models/{id}/download: a pre-signed link to the final LoRA, or to one checkpoint's."""
    with service.db.transaction() as session:
        if checkpoint_step is not None:
            model = expert_model(session, model_id, caller)
            step = checkpoint_or_404(session, model_id, checkpoint_step).step
        else:
            model = model_or_404(session, model_id, caller)
            if model.status != "Completed":
                raise BadRequestError(f"The model status is not completed (it is {model.status}): download a "
                                      "published checkpoint with ?checkpoint_step=N, or wait for the training to end.")
            step = final_step(model)
            checkpoint_or_404(session, model_id, step)
        family = service.version_map.get(canonical_version(model.training_version), "")
    url, expires = signed_url(service, request,
                              f"{FILES_PREFIX}/models/{model_id}/checkpoints/{step}/pytorch_lora_weights.safetensors",
                              model.org)
    return {"download_url": url, **base_model_view(family), "checkpoint_step": step, "expires": expires}


def log_tail(service: Service, model_id: int, lines: int) -> list[str]:
    """The last `lines` lines of the model's train.log (all its attempts; empty before the job starts)."""
    try:
        tail = tail_lines(service.runner.run_dir(model_id) / LOG_FILE, lines * _LOG_BYTES_PER_LINE)
    except FileNotFoundError:
        tail = []
    return tail[-lines:]


# ---- bring your own LoRA ---------------------------------------------------------------------------

MAX_LORA_BYTES = 3 * 2**30  # Bria's limit


class UnsupportedModelFormatError(TailoredGenError):
    code = "unsupported_model_format"
    http_status = 415


def upload_model(service: Service, body: UploadModelRequest, caller: Caller) -> dict:
    """POST /models/upload_model: a legacy LoRA file becomes a Completed model, once it has loaded
    into the family's pipeline (the warm one generation uses); a file that does not fit is a 400
    naming why. Its one checkpoint (step UPLOADED_STEP) is what generation and download serve."""
    errors = UploadModelRequest.rule_errors(body.model_dump())
    if is_fibo(body.training_version):  # the schema lists legacy versions only; a version map could still say fibo
        errors.append(FieldError("FIBO models cannot be uploaded; upload a Bria 3.2 or 2.3 LoRA", "training_version",
                                 body.training_version))
    if errors:
        raise InvalidParameterError(errors)
    if body.project_id is not None:  # 404 before any complaint about the file or the version
        with service.db.transaction() as session:
            _legacy_project(project_or_404(session, body.project_id, caller))
    family = service.family_of(body.training_version)
    source = resolve_source(body.model_url, "model_url", service.settings.import_roots, MAX_LORA_BYTES)
    name = PurePosixPath(urlsplit(body.model_url).path if source.url else source.path.name).name
    if not name.endswith(".safetensors"):
        raise UnsupportedModelFormatError(f"Invalid file format: model_url names {name or 'no file'!r}; the model has "
                                          "to be a LoRA in .safetensors format")
    runs = service.settings.data_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    staging = runs / f".upload-{uuid.uuid4().hex}.safetensors"
    target: Path | None = None
    try:
        if source.path is not None:
            shutil.copyfile(source.path, staging)  # our own copy: the check and the model use the same bytes
        else:
            fetch(source, staging, MAX_LORA_BYTES)
        try:
            service.generations.check_lora(family, staging)
        except LoraFileError as exc:  # the message names the staging file: name the request's field instead
            raise LoraFileError(exc.message.replace(str(staging), "model_url's file")) from None
        with service.db.transaction() as session:
            if body.project_id is not None:
                project = _legacy_project(project_or_404(session, body.project_id, caller))
                project.training_version = project.training_version or body.training_version  # locks it, as a dataset
            else:
                project = Project(**body.project_parameters.model_dump(), org=caller.organization,
                                  training_version=body.training_version)
                session.add(project)
                session.flush()
            model = Model(name=body.model_name or name.removesuffix(".safetensors")[:256] or "uploaded model",
                          description="", dataset_id=None, project_id=project.id, org=project.org,
                          training_version=body.training_version, training_mode="fully_automated",
                          status="Completed", training_parameters={}, generation_prefix=body.caption_prefix,
                          owner=caller.token_id)
            session.add(model)
            session.flush()
            run_dir = service.runner.run_dir(model.id)
            job = TrainingJob(model_id=model.id, attempt=1, run_dir=str(run_dir), launcher="upload",
                              host=socket.gethostname(), ended_at=utcnow(), outcome="uploaded")
            session.add(job)
            session.flush()
            session.add(Checkpoint(model_id=model.id, training_job_id=job.id, step=UPLOADED_STEP))
            target = run_dir / f"checkpoint-{UPLOADED_STEP}" / LORA_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
            session.flush()
            return model_view(session, model)
    except BaseException:
        if target is not None:
            target.unlink(missing_ok=True)
        raise
    finally:
        staging.unlink(missing_ok=True)


def _legacy_project(project: Project) -> Project:
    if project.training_version is not None and is_fibo(project.training_version):
        raise InvalidParameterError.single("project_id", project.id, f"project {project.id} is locked to FIBO; an "
                                           "uploaded legacy model needs a legacy project or project_parameters")
    return project
