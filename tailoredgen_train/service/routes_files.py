"""The file behind a download link. No api_token here: the link is pre-signed, and its signature
and expiry are the credential (a link without a valid signature gets 401)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from ..engine.checkpoint import LORA_FILE
from ..errors import NotFoundError
from .app import service_of
from .schemas import ERROR_RESPONSES, MAX_ID

router = APIRouter(tags=["downloads"], responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 404)})


@router.get("/files/models/{model_id}/checkpoints/{step}/pytorch_lora_weights.safetensors",
            response_class=FileResponse)
def download_file(request: Request, model_id: Annotated[int, PathParam(ge=1, le=MAX_ID)],
                  step: Annotated[int, PathParam(ge=1, le=MAX_ID)],
                  expires: Annotated[int, Query(ge=0, le=MAX_ID)], signature: Annotated[str, Query(max_length=128)]):
    service = service_of(request)
    service.signer.verify(request.url.path, expires, signature)
    path = service.runner.run_dir(model_id) / f"checkpoint-{step}" / LORA_FILE
    if not path.is_file():
        raise NotFoundError(f"the checkpoint file for model {model_id} step {step} no longer exists")
    return FileResponse(path, media_type="application/octet-stream",
                        filename=f"tailoredgen-model-{model_id}-step-{step}.safetensors")
