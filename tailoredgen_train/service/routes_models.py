"""Models, start/stop training, progress, logs, the run report, checkpoints (with their sample
images) and download links."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..contract import (DatasetRecord, ModelRecord, canonical_version, check_can_start, generation_prefix,
                        is_fibo)
from ..engine.run_log import LOG_FILE
from ..errors import FieldError, InvalidParameterError, NotFoundError
from ..recipe import JobSpec
from ..report.html import REPORT_FILE
from ..report.metrics import tail_lines
from ..start import start_training
from .core import Service
from .deps import FILES_PREFIX, BadRequestError, ConflictError, model_or_404, service_of, signed_url
from .db import Checkpoint, Dataset, Model, utcnow
from .runner import ACTIVE
from .schemas import (ERROR_RESPONSES, MAX_ID, CheckpointDetailOut, CheckpointListOut, DownloadOut, LogOut,
                      ModelCreate, ModelOut, ModelUpdate, StartTrainingRequest)
from .views import base_model_view, checkpoint_samples, checkpoint_steps, checkpoint_view, model_view, progress_view

router = APIRouter(tags=["models and training"], responses=ERROR_RESPONSES)
ModelId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
Step = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[100])]
MAX_LOG_LINES = 2000
_LOG_BYTES_PER_LINE = 1024  # what a tail read allows per requested line (long lines are cut at the start)


@router.post("/models", status_code=201, response_model=ModelOut, response_model_exclude_unset=True)
def create_model(body: ModelCreate, request: Request) -> dict:
    service = service_of(request)
    with service.db.transaction() as session:
        dataset = session.get(Dataset, body.dataset_id)
        if dataset is None:
            raise NotFoundError(f"Dataset not found: there is no dataset {body.dataset_id}")
        version = body.training_version or dataset.training_version
        if is_fibo(version) != is_fibo(dataset.training_version):
            raise InvalidParameterError.single(
                "training_version", version, f"dataset {dataset.id} is a {dataset.training_version!r} dataset: FIBO "
                "models need a fibo dataset, legacy models (max, light, 3.2, 2.3) a legacy one")
        service.family_of(version)
        model = Model(name=body.name, description=body.description, dataset_id=dataset.id,
                      project_id=dataset.project_id, training_version=version, training_mode=body.training_mode,
                      training_parameters={})
        session.add(model)
        session.flush()
        return model_view(session, model)


@router.get("/models", response_model=list[ModelOut], response_model_exclude_unset=True)
def list_models(request: Request, include_training_parameters: bool = False) -> list[dict]:
    with service_of(request).db.transaction() as session:
        models = session.scalars(select(Model).where(Model.status != "Deleted").order_by(Model.id))
        return [model_view(session, m, include_training_parameters=include_training_parameters) for m in models]


@router.get("/models/{model_id}", response_model=ModelOut, response_model_exclude_unset=True)
def get_model(model_id: ModelId, request: Request) -> dict:
    """The Model, plus `training_progress` (step, loss, pace, ETA) once its training has recorded a step."""
    service = service_of(request)
    with service.db.transaction() as session:
        model = model_or_404(session, model_id)
        body = model_view(session, model)
    progress = progress_view(service.runner.run_dir(model_id), model.status)
    if progress is not None:
        body["training_progress"] = progress
    return body


@router.put("/models/{model_id}", response_model=ModelOut, response_model_exclude_unset=True)
def update_model(model_id: ModelId, body: ModelUpdate, request: Request) -> dict:
    """Rename or describe a model; `active_model_version` (extension) picks the checkpoint that
    generation uses when a request names none."""
    with service_of(request).db.transaction() as session:
        model = model_or_404(session, model_id)
        if body.active_model_version is not None:
            _check_selectable(session, model, body.active_model_version)
        for name, value in body.model_dump(exclude_none=True).items():
            setattr(model, name, value)
        model.updated_at = utcnow()
        return model_view(session, model)


def _check_selectable(session: Session, model: Model, step: str) -> None:
    if model.status != "Completed" or model.training_mode != "expert":
        raise BadRequestError(f"active_model_version can only be set on a Completed expert model; model {model.id} "
                              f"is {model.status} ({model.training_mode}).")
    published = checkpoint_steps(session, model)
    if step not in published:
        raise InvalidParameterError.single("active_model_version", step, f"model {model.id} has no checkpoint at "
                                           f"step {step}; its checkpoints: {', '.join(published) or 'none'}")


@router.delete("/models/{model_id}", status_code=204)
def delete_model(model_id: ModelId, request: Request) -> Response:
    """Marks the model Deleted; its run folder (checkpoints, logs) stays on disk for the operator."""
    with service_of(request).db.transaction() as session:
        model_or_404(session, model_id)
        deleted = session.execute(update(Model).where(Model.id == model_id, Model.status.not_in(ACTIVE))
                                  .values(status="Deleted", updated_at=utcnow())).rowcount
        if deleted != 1:
            raise ConflictError("Cannot delete model while it is in training: stop it first "
                                f"(POST /tailored-gen/models/{model_id}/stop_training).")
    return Response(status_code=204)


# ---- training ----------------------------------------------------------------------------------


class _ClaimThenSubmit:
    """start_training's launcher here: the atomic claim, then the backend."""

    def __init__(self, service: Service, model_id: int, owner: str, prefix: str | None):
        self.service, self.model_id, self.owner, self.prefix = service, model_id, owner, prefix

    def launch(self, job: JobSpec) -> None:
        self.service.runner.claim(self.model_id, self.owner, job.params.to_dict(), self.prefix)
        self.service.runner.submit(self.model_id, job)


def _parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}  # clients send no body to take every default
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameterError([FieldError("the request body is not valid JSON", "body",
                                                raw[:200].decode("utf-8", "replace"))]) from None
    if not isinstance(body, dict):
        raise InvalidParameterError([FieldError("the request body must be a JSON object", "body", str(body)[:200])])
    return body


@router.post("/models/{model_id}/start_training", response_model=ModelOut, response_model_exclude_unset=True,
             openapi_extra={"requestBody": {
    "required": False,
    "content": {"application/json": {"schema": StartTrainingRequest.model_json_schema()}}}})
async def start_model_training(model_id: ModelId, request: Request) -> dict:
    """Start training: 200 with the Model (status InProgress, the resolved training_parameters).
    Errors in the documented order: 404, 409, 412, 400."""
    body = await request.body()
    return await run_in_threadpool(_start, service_of(request), model_id, body, request.state.caller)


def _start(service: Service, model_id: int, raw: bytes, owner: str) -> dict:
    with service.db.transaction() as session:
        model = model_or_404(session, model_id)
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
    request = _parse_body(raw)
    family = service.family_of(model.training_version)
    launcher = _ClaimThenSubmit(service, model_id, owner,
                                generation_prefix(model.training_version, dataset.caption_prefix))
    response = start_training(model_record, dataset_record, request, base=service.settings.bases[family],
                              output_dir=service.runner.run_dir(model_id), engine=service.engine_config(family),
                              launcher=launcher, version_map=service.settings.version_map)
    return response.to_dict()


@router.post("/models/{model_id}/stop_training", response_model=ModelOut, response_model_exclude_unset=True)
def stop_model_training(model_id: ModelId, request: Request) -> dict:
    """InProgress -> Stopping; the model becomes Stopped when its job has exited. It cannot be resumed."""
    service = service_of(request)
    with service.db.transaction() as session:
        model_or_404(session, model_id)
    if not service.runner.request_stop(model_id):
        raise ConflictError(f"Training already stopped/not in training: model {model_id} is not InProgress.")
    with service.db.transaction() as session:
        return model_view(session, model_or_404(session, model_id))


# ---- checkpoints and download ------------------------------------------------------------------


def _expert_model(session: Session, model_id: int) -> Model:
    model = model_or_404(session, model_id)
    if model.training_mode != "expert":
        raise BadRequestError(f"Checkpoints are only available for models trained in expert mode; model {model_id} "
                              "is fully_automated.")
    return model


@router.get("/models/{model_id}/checkpoints", response_model=CheckpointListOut)
def list_checkpoints(model_id: ModelId, request: Request) -> dict:
    with service_of(request).db.transaction() as session:
        model = _expert_model(session, model_id)
        rows = session.scalars(select(Checkpoint).where(Checkpoint.model_id == model_id)
                               .order_by(Checkpoint.step.desc()))
        return {"checkpoints": [checkpoint_view(c) for c in rows], "active_model_version": model.active_model_version}


def _checkpoint(session: Session, model_id: int, step: int) -> Checkpoint:
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.model_id == model_id, Checkpoint.step == step))
    if checkpoint is None:
        raise NotFoundError(f"Checkpoint not found: model {model_id} has no checkpoint at step {step}")
    return checkpoint


@router.get("/models/{model_id}/checkpoints/{checkpoint_step}", response_model=CheckpointDetailOut)
def get_checkpoint(model_id: ModelId, checkpoint_step: Step, request: Request) -> dict:
    """The checkpoint, with pre-signed links to the validation images rendered when it was saved."""
    service = service_of(request)
    with service.db.transaction() as session:
        _expert_model(session, model_id)
        body = checkpoint_view(_checkpoint(session, model_id, checkpoint_step))
    folder = service.runner.run_dir(model_id) / f"checkpoint-{checkpoint_step}"
    prefix = f"{FILES_PREFIX}/models/{model_id}/checkpoints/{checkpoint_step}/samples"
    body["samples"] = [{"image_url": signed_url(service, request, f"{prefix}/{s['file']}")[0], "prompt": s["prompt"],
                        "seed": s["seed"]} for s in checkpoint_samples(folder)]
    grid = folder / "samples" / "grid.png"
    body["samples_grid_url"] = signed_url(service, request, f"{prefix}/grid.png")[0] if grid.is_file() else None
    return body


@router.get("/models/{model_id}/download", response_model=DownloadOut)
def download_model(model_id: ModelId, request: Request,
                   checkpoint_step: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> dict:
    """A pre-signed link to the LoRA (.safetensors) of the finished model, or of one checkpoint."""
    service = service_of(request)
    with service.db.transaction() as session:
        if checkpoint_step is not None:
            model = _expert_model(session, model_id)
            step = _checkpoint(session, model_id, checkpoint_step).step
        else:
            model = model_or_404(session, model_id)
            if model.status != "Completed":
                raise BadRequestError(f"The model status is not completed (it is {model.status}): download a "
                                      "published checkpoint with ?checkpoint_step=N, or wait for the training to end.")
            step = int(model.training_parameters["total_training_steps"])
            _checkpoint(session, model_id, step)
        family = service.version_map.get(canonical_version(model.training_version), "")
    url, expires = signed_url(service, request,
                              f"{FILES_PREFIX}/models/{model_id}/checkpoints/{step}/pytorch_lora_weights.safetensors")
    return {"download_url": url, **base_model_view(family), "checkpoint_step": step, "expires": expires}


# ---- what the run leaves for people: its log and its report --------------------------------------


@router.get("/models/{model_id}/logs", response_model=LogOut)
def get_logs(model_id: ModelId, request: Request,
             lines: Annotated[int, Query(ge=1, le=MAX_LOG_LINES, description="how many of the last lines")] = 200
             ) -> dict:
    """The end of the training job's train.log (all its attempts, a resumed job appends)."""
    service = service_of(request)
    with service.db.transaction() as session:
        model_or_404(session, model_id)
    try:
        tail = tail_lines(service.runner.run_dir(model_id) / LOG_FILE, lines * _LOG_BYTES_PER_LINE)
    except FileNotFoundError:
        tail = []
    return {"model_id": model_id, "lines": tail[-lines:]}


# response_class=Response: only 200 is HTML (documented below); the errors stay JSON in the description
@router.get("/models/{model_id}/report", response_class=Response, responses={200: {
    "description": "the run's report.html: status, loss curve, sample grids, settings",
    "content": {"text/html": {"schema": {"type": "string"}}}}})
def get_report(model_id: ModelId, request: Request) -> FileResponse:
    """The run's self-contained report page, rebuilt at each checkpoint and at the end of training."""
    service = service_of(request)
    with service.db.transaction() as session:
        model_or_404(session, model_id)
    path = service.runner.run_dir(model_id) / REPORT_FILE
    if not path.is_file():
        raise NotFoundError(f"Report not found: model {model_id} has no report yet; the training writes it at its "
                            "first checkpoint")
    # the page is static (inline CSS, data: images): forbid scripts and every other source
    return FileResponse(path, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff"})

