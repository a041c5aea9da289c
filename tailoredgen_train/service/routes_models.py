"""Models, start/stop training, progress, logs, the run report, checkpoints (with their sample
images) and download links."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..errors import InvalidParameterError, NotFoundError
from ..report.html import REPORT_FILE
from . import models
from .deps import FILES_PREFIX, BadRequestError, ConflictError, caller_of, model_or_404, service_of, signed_url
from .db import Checkpoint, Model, utcnow
from .models import MAX_LOG_LINES, checkpoint_or_404, expert_model
from .runner import ACTIVE
from .schemas import (ERROR_RESPONSES, MAX_ID, CheckpointDetailOut, CheckpointListOut, DownloadOut, LogOut,
                      ModelCreate, ModelOut, ModelUpdate, StartTrainingRequest, UploadModelRequest)
from .views import (checkpoint_samples, checkpoint_steps, checkpoint_view, model_view, progress_view,
                    queued_progress_view)

router = APIRouter(tags=["models and training"], responses=ERROR_RESPONSES)
ModelId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
Step = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[100])]


@router.post("/models", status_code=201, response_model=ModelOut, response_model_exclude_unset=True)
def create_model(body: ModelCreate, request: Request) -> dict:
    return models.create_model(service_of(request), body, caller_of(request))


@router.post("/models/upload_model", response_model=ModelOut, response_model_exclude_unset=True)
def upload_model(body: UploadModelRequest, request: Request) -> dict:
    """Bring your own LoRA: a legacy (Bria 3.2 / 2.3) .safetensors LoRA becomes a Completed model once it has loaded
    into the family's pipeline; generate with it through /v1 and download it like a trained one."""
    return models.upload_model(service_of(request), body, caller_of(request))


@router.get("/models", response_model=list[ModelOut], response_model_exclude_unset=True)
def list_models(request: Request, include_training_parameters: bool = False) -> list[dict]:
    with service_of(request).db.read() as session:
        query = caller_of(request).scope(select(Model).where(Model.status != "Deleted").order_by(Model.id))
        return [model_view(session, m, include_training_parameters=include_training_parameters)
                for m in session.scalars(query)]


@router.get("/models/{model_id}", response_model=ModelOut, response_model_exclude_unset=True)
def get_model(model_id: ModelId, request: Request) -> dict:
    """The Model, plus `training_progress` (step, loss, pace, ETA) once its training has recorded a step,
    or its place in the queue while its job waits for a free GPU slice."""
    service = service_of(request)
    with service.db.read() as session:
        model = model_or_404(session, model_id, caller_of(request))
        body = model_view(session, model)
    position = service.runner.queue_position(model_id) if model.status == "InProgress" else None
    progress = (queued_progress_view(position, model.training_parameters.get("total_training_steps")) if position
                else progress_view(service.runner.run_dir(model_id), model.status))
    if progress is not None:
        body["training_progress"] = progress
    return body


@router.put("/models/{model_id}", response_model=ModelOut, response_model_exclude_unset=True)
def update_model(model_id: ModelId, body: ModelUpdate, request: Request) -> dict:
    """Rename or describe a model; `active_model_version` (extension) picks the checkpoint that
    generation uses when a request names none."""
    with service_of(request).db.transaction() as session:
        model = model_or_404(session, model_id, caller_of(request))
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
        model_or_404(session, model_id, caller_of(request))
        deleted = session.execute(update(Model).where(Model.id == model_id, Model.status.not_in(ACTIVE))
                                  .values(status="Deleted", updated_at=utcnow())).rowcount
        if deleted != 1:
            raise ConflictError("Cannot delete model while it is in training: stop it first "
                                f"(POST /tailored-gen/models/{model_id}/stop_training).")
    return Response(status_code=204)


# ---- training ----------------------------------------------------------------------------------


@router.post("/models/{model_id}/start_training", response_model=ModelOut, response_model_exclude_unset=True,
             openapi_extra={"requestBody": {
    "required": False,
    "content": {"application/json": {"schema": StartTrainingRequest.model_json_schema()}}}})
async def start_model_training(model_id: ModelId, request: Request) -> dict:
    """Start training: 200 with the Model (status InProgress, the resolved training_parameters).
    Errors in the documented order: 404, 409, 412, 400."""
    body = await request.body()
    return await run_in_threadpool(models.start_model, service_of(request), model_id, body, caller_of(request))


@router.post("/models/{model_id}/stop_training", response_model=ModelOut, response_model_exclude_unset=True)
def stop_model_training(model_id: ModelId, request: Request) -> dict:
    """InProgress -> Stopping; the model becomes Stopped when its job has exited. It cannot be resumed."""
    return models.stop_model(service_of(request), model_id, caller_of(request))


# ---- checkpoints and download ------------------------------------------------------------------


@router.get("/models/{model_id}/checkpoints", response_model=CheckpointListOut)
def list_checkpoints(model_id: ModelId, request: Request) -> dict:
    with service_of(request).db.read() as session:
        model = expert_model(session, model_id, caller_of(request))
        rows = session.scalars(select(Checkpoint).where(Checkpoint.model_id == model_id)
                               .order_by(Checkpoint.step.desc()))
        return {"checkpoints": [checkpoint_view(c) for c in rows], "active_model_version": model.active_model_version}


@router.get("/models/{model_id}/checkpoints/{checkpoint_step}", response_model=CheckpointDetailOut)
def get_checkpoint(model_id: ModelId, checkpoint_step: Step, request: Request) -> dict:
    """The checkpoint, with pre-signed links to the validation images rendered when it was saved."""
    service = service_of(request)
    with service.db.read() as session:
        organization = expert_model(session, model_id, caller_of(request)).org
        body = checkpoint_view(checkpoint_or_404(session, model_id, checkpoint_step))
    folder = service.runner.run_dir(model_id) / f"checkpoint-{checkpoint_step}"
    prefix = f"{FILES_PREFIX}/models/{model_id}/checkpoints/{checkpoint_step}/samples"
    body["samples"] = [{"image_url": signed_url(service, request, f"{prefix}/{s['file']}", organization)[0],
                        "prompt": s["prompt"], "seed": s["seed"]} for s in checkpoint_samples(folder)]
    grid = folder / "samples" / "grid.png"
    body["samples_grid_url"] = (signed_url(service, request, f"{prefix}/grid.png", organization)[0]
                                if grid.is_file() else None)
    return body


@router.get("/models/{model_id}/download", response_model=DownloadOut)
def download_model(model_id: ModelId, request: Request,
                   checkpoint_step: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None) -> dict:
    """A pre-signed link to the LoRA (.safetensors) of the finished model, or of one checkpoint."""
    return models.download_link(service_of(request), request, model_id, checkpoint_step, caller_of(request))


# ---- what the run leaves for people: its log and its report --------------------------------------


@router.get("/models/{model_id}/logs", response_model=LogOut)
def get_logs(model_id: ModelId, request: Request,
             lines: Annotated[int, Query(ge=1, le=MAX_LOG_LINES, description="how many of the last lines")] = 200
             ) -> dict:
    """The end of the training job's train.log (all its attempts, a resumed job appends)."""
    service = service_of(request)
    with service.db.read() as session:
        model_or_404(session, model_id, caller_of(request))
    return {"model_id": model_id, "lines": models.log_tail(service, model_id, lines)}


# response_class=Response: only 200 is HTML (documented below); the errors stay JSON in the description
@router.get("/models/{model_id}/report", response_class=Response, responses={200: {
    "description": "the run's report.html: status, loss curve, sample grids, settings",
    "content": {"text/html": {"schema": {"type": "string"}}}}})
def get_report(model_id: ModelId, request: Request) -> FileResponse:
    """The run's self-contained report page, rebuilt at each checkpoint and at the end of training."""
    service = service_of(request)
    with service.db.read() as session:
        model_or_404(session, model_id, caller_of(request))
    path = service.runner.run_dir(model_id) / REPORT_FILE
    if not path.is_file():
        raise NotFoundError(f"Report not found: model {model_id} has no report yet; the training writes it at its "
                            "first checkpoint")
    # the page is static (inline CSS, data: images): forbid scripts and every other source
    return FileResponse(path, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff"})

