"""The files behind pre-signed links: a checkpoint's LoRA, its sample images, generated images.
No api_token here: the link is pre-signed, and its signature and expiry are the credential (a link
without a valid signature gets 401). The signature covers the organization that owns the file, as
the database says now: a link to a deleted model's file stops working. A client's requests with a
bad signature count against the request rate (--rate-limit), per client address: beyond it, 429.
A route serves only the files of its own folder: names are matched against a pattern and the
resolved path must stay inside that folder."""

from __future__ import annotations

from typing import Annotated, Callable

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from ..engine.checkpoint import LORA_FILE
from ..errors import NotFoundError, UnauthorizedError
from ..inference.validation import SAMPLES_DIR
from .core import Service
from .db import Model
from .deps import file_inside, service_of
from .schemas import ERROR_RESPONSES, MAX_ID
from .views import SAMPLE_FILE

router = APIRouter(tags=["downloads"], responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 404)})
ModelId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
Step = Annotated[int, PathParam(ge=1, le=MAX_ID)]
Expires = Annotated[int, Query(ge=0, le=MAX_ID)]
Signature = Annotated[str, Query(max_length=128)]
PNG = {200: {"content": {"image/png": {}}, "description": "the PNG"}}


@router.get("/files/models/{model_id}/checkpoints/{step}/pytorch_lora_weights.safetensors",
            response_class=FileResponse)
def download_file(request: Request, model_id: ModelId, step: Step, expires: Expires, signature: Signature):
    service = service_of(request)
    _verify(service, request, expires, signature, lambda: _model_owner(service, model_id))
    path = service.runner.run_dir(model_id) / f"checkpoint-{step}" / LORA_FILE
    if not path.is_file():
        raise NotFoundError(f"the checkpoint file for model {model_id} step {step} no longer exists")
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"tailoredgen-model-{model_id}-step-{step}.safetensors")


@router.get("/files/models/{model_id}/checkpoints/{step}/samples/{file_name}", response_class=FileResponse,
            responses=PNG)
def sample_file(request: Request, model_id: ModelId, step: Step,
                file_name: Annotated[str, PathParam(pattern=f"^{SAMPLE_FILE.pattern}$")],
                expires: Expires, signature: Signature):
    """A validation image of a checkpoint (the links of GET /models/{id}/checkpoints/{step})."""
    service = service_of(request)
    _verify(service, request, expires, signature, lambda: _model_owner(service, model_id))
    folder = service.runner.run_dir(model_id) / f"checkpoint-{step}" / SAMPLES_DIR
    return FileResponse(file_inside(folder, file_name), media_type="image/png")


@router.get("/files/generations/{request_id}/{file_name}", response_class=FileResponse, responses=PNG)
def generated_file(request: Request, request_id: Annotated[str, PathParam(pattern="^[0-9a-f]{32}$")],
                   file_name: Annotated[str, PathParam(pattern=r"^[0-9]{2,3}\.png$")],
                   expires: Expires, signature: Signature):
    """An image a generation request rendered."""
    service = service_of(request)
    _verify(service, request, expires, signature, lambda: _generation_owner(service, request_id))
    return FileResponse(file_inside(service.generations.folder(request_id), file_name), media_type="image/png")


def _verify(service: Service, request: Request, expires: int, signature: str, owner: Callable[[], str | None]) -> None:
    """The link's signature and expiry, checked against the file's owner now (401). A client's bad
    signatures count against the request rate, per address; beyond it, any link it sends gets 429
    before the owner is looked up."""
    address = f"address:{request.client.host if request.client else '-'}"
    per = "client address for links with a bad signature"
    service.limiter.check(address, record=False, per=per)
    try:
        service.signer.verify(request.url.path, expires, signature, owner())
    except UnauthorizedError:
        service.limiter.check(address, per=per)
        raise


def _generation_owner(service: Service, request_id: str) -> str | None:
    job = service.generations.load(request_id)
    return job.org if job is not None else None


def _model_owner(service: Service, model_id: int) -> str | None:
    """The organization of a model that still exists (a deleted model's links stop working)."""
    with service.db.read() as session:
        model = session.get(Model, model_id)
        return model.org if model is not None and model.status != "Deleted" else None
