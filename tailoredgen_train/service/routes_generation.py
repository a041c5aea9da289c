"""Bria's generation endpoints with a trained model, rendered by the generation worker
(generation.py), never in a handler:

    POST /v2/image/generate/tailored                           FIBO models
    POST /v1/text-to-image/tailored/{model_id}[/{step}]        legacy models (max, light, 3.2, 2.3)
    GET  /v2/status/{request_id}                               an asynchronous request's state

What a request asks for (the model lookup, prompt and settings) is generation_requests.py, which
the console shares.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from .core import Service
from .db import GenerationRequest
from .deps import FILES_PREFIX, AsciiJSONResponse, caller_of, public_base_url, service_of, signed_url
from .generation import COMPLETED, FAILED
from .generation_requests import fibo_request, legacy_request, own_generation
from .schemas import (ERROR_RESPONSES, MAX_ID, AcceptedOut, GenerateTailoredOut, GenerateTailoredRequest, MessageOut,
                      StatusOut, TextToImageTailoredOut, TextToImageTailoredRequest)

router = APIRouter(tags=["generation"], responses={
    **{k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 404, 429)},
    500: {"model": MessageOut, "description": "a sync request whose generation failed (its message says why), or "
                                              "an internal error"}})
ACCEPTED = {202: {"model": AcceptedOut, "description": "queued (sync false): poll status_url"}}
ModelId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
Step = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[100])]


@router.post("/v2/image/generate/tailored", response_model=GenerateTailoredOut, responses=ACCEPTED)
async def generate_tailored(body: GenerateTailoredRequest, request: Request) -> Any:
    """Generate with a FIBO model at its active_model_version. `sync: true` answers 200 with the
    image; otherwise 202 with a status_url to poll."""
    service = service_of(request)
    job = await run_in_threadpool(fibo_request, service, body, caller_of(request))
    return await _answer(service, request, job, body.sync)


@router.post("/v1/text-to-image/tailored/{model_id}", response_model=TextToImageTailoredOut, responses=ACCEPTED)
async def text_to_image_tailored(model_id: ModelId, body: TextToImageTailoredRequest, request: Request) -> Any:
    """Generate with a legacy model at its active_model_version. `sync: true` answers 200 with
    `{"result": [{"urls": [...], "seed"}]}`; otherwise 202 with a status_url to poll."""
    return await _legacy(request, model_id, None, body)


@router.post("/v1/text-to-image/tailored/{model_id}/{checkpoint_step}", response_model=TextToImageTailoredOut,
             responses=ACCEPTED)
async def text_to_image_tailored_checkpoint(model_id: ModelId, checkpoint_step: Step,
                                            body: TextToImageTailoredRequest, request: Request) -> Any:
    """The same with one of the model's checkpoints."""
    return await _legacy(request, model_id, checkpoint_step, body)


@router.get("/v2/status/{request_id}", response_model=StatusOut)
def get_status(request_id: Annotated[str, PathParam(max_length=64)], request: Request) -> dict:
    """IN_PROGRESS, COMPLETED (with `result.image_url`) or FAILED (with `error.message`)."""
    service = service_of(request)
    return _status_view(service, request, own_generation(service, request_id, caller_of(request)))


async def _legacy(request: Request, model_id: int, step: int | None, body: TextToImageTailoredRequest) -> Any:
    service = service_of(request)
    job = await run_in_threadpool(legacy_request, service, model_id, step, body, caller_of(request))
    return await _answer(service, request, job, body.sync)


# ---- answers -------------------------------------------------------------------------------------


async def _answer(service: Service, request: Request, job: GenerationRequest, sync: bool) -> Any:
    """Queue the request; a sync one waits for the worker without holding a thread."""
    if not sync:
        await run_in_threadpool(service.generations.enqueue, job)
        return AsciiJSONResponse({"request_id": job.id, "status_url": _status_url(service, request, job.id)},
                                 status_code=202)
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def finished() -> None:
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    await run_in_threadpool(service.generations.enqueue, job, finished)
    await done
    job = await run_in_threadpool(service.generations.load, job.id)
    if job.status == FAILED:
        return AsciiJSONResponse({"message": f"Generation failed: {job.error_message}", "code": job.error_code,
                                  "request_id": job.id}, status_code=500)
    urls = _image_urls(service, request, job)
    seed = job.settings["seed"]
    if job.api == "v2":
        return {"image_url": urls[0], "structured_prompt": job.prompt, "seed": seed, "request_id": job.id}
    return {"result": [{"urls": [url], "seed": seed + i} for i, url in enumerate(urls)]}


def _status_url(service: Service, request: Request, request_id: str) -> str:
    return f"{public_base_url(service, request)}/v2/status/{request_id}"


def _image_urls(service: Service, request: Request, job: GenerationRequest) -> list[str]:
    # signed when asked for, so a status polled later still gets links that work
    return [signed_url(service, request, f"{FILES_PREFIX}/generations/{job.id}/{name}", job.org)[0]
            for name in job.images]


def _status_view(service: Service, request: Request, job: GenerationRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"request_id": job.id, "status": job.status, "result": None, "error": None}
    if job.status == COMPLETED:
        urls = _image_urls(service, request, job)
        body["result"] = {"image_url": urls[0], "seed": job.settings["seed"]}
        if job.api == "v2":
            body["result"]["structured_prompt"] = job.prompt
        else:
            body["result"]["urls"] = urls
    elif job.status == FAILED:
        body["error"] = {"code": job.error_code, "message": job.error_message}
    return body
