"""Bria's generation endpoints with a trained model, rendered by the generation worker
(generation.py), never in a handler:

    POST /v2/image/generate/tailored                           FIBO models
    POST /v1/text-to-image/tailored/{model_id}[/{step}]        legacy models (max, light, 3.2, 2.3)
    GET  /v2/status/{request_id}                               an asynchronous request's state

A model is found only by the token that trained it (the `owner` of the model: this service has no
organizations, so a model belongs to the token that started its training); anyone else gets 404.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..contract import is_fibo
from ..errors import InvalidParameterError, NotFoundError, PromptError
from ..inference import GenerationSettings
from .core import Service
from .db import Checkpoint, GenerationRequest, Model
from .deps import FILES_PREFIX, AsciiJSONResponse, BadRequestError, model_or_404, public_base_url, service_of, \
    signed_url
from .generation import COMPLETED, FAILED
from .schemas import (ERROR_RESPONSES, MAX_ID, AcceptedOut, GenerateTailoredOut, GenerateTailoredRequest, MessageOut,
                      StatusOut, TextToImageTailoredOut, TextToImageTailoredRequest)
from .views import checkpoint_steps

router = APIRouter(tags=["generation"], responses={
    **{k: v for k, v in ERROR_RESPONSES.items() if k in (400, 401, 404, 429)},
    500: {"model": MessageOut, "description": "a sync request whose generation failed (its message says why), or "
                                              "an internal error"}})
ACCEPTED = {202: {"model": AcceptedOut, "description": "queued (sync false): poll status_url"}}
ModelId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
Step = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[100])]
RANDOM_SEEDS = 2**31  # a request without a seed draws one below this (and answers with it)
NO_EXPANDER = ("A plain-text prompt needs a captioning model to expand it into a FIBO structured prompt, and none "
               "is configured on this server (the operator enables one with `tailoredgen-train serve --vlm "
               "briaai/FIBO-vlm`). Send structured_prompt instead: a JSON object as a string, e.g. "
               '{"short_description": "a red fox in fresh snow", "background_setting": "a pine forest"}.')


@router.post("/v2/image/generate/tailored", response_model=GenerateTailoredOut, responses=ACCEPTED)
async def generate_tailored(body: GenerateTailoredRequest, request: Request) -> Any:
    """Generate with a FIBO model at its active_model_version. `sync: true` answers 200 with the
    image; otherwise 202 with a status_url to poll."""
    service = service_of(request)
    job = await run_in_threadpool(_fibo_request, service, body, request.state.caller)
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
    job = service.generations.load(request_id)
    if job is None or job.owner != request.state.caller:
        raise NotFoundError(f"Request not found: there is no generation request {request_id}")
    return _status_view(service, request, job)


# ---- what a request asks for -------------------------------------------------------------------


async def _legacy(request: Request, model_id: int, step: int | None, body: TextToImageTailoredRequest) -> Any:
    service = service_of(request)
    job = await run_in_threadpool(_legacy_request, service, model_id, step, body, request.state.caller)
    return await _answer(service, request, job, body.sync)


def _fibo_request(service: Service, body: GenerateTailoredRequest, owner: str) -> GenerationRequest:
    model_id = _model_id(body.tailored_model_id)
    with service.db.transaction() as session:
        model, family, step = _generating_model(session, service, model_id, owner, fibo=True)
    prompt_text = body.prompt if body.prompt and body.prompt.strip() else None
    structured = body.structured_prompt
    prompt = None
    if prompt_text is not None:  # generate from text, or refine a structured prompt with it
        if service.prompt_expander is None:
            raise PromptError(NO_EXPANDER)
        if structured is not None:
            structured = service.family(family).prepare_prompt(structured)
    elif structured is not None:
        prompt = service.family(family).prepare_prompt(structured)
    else:
        raise InvalidParameterError.single("structured_prompt", "", "send structured_prompt (a structured JSON prompt "
                                           "as a string), or prompt when the server has a captioning model")
    settings = _settings(service, family, seed=body.seed, num_images=1, steps=body.steps_num,
                         guidance=body.guidance_scale, aspect_ratio=body.aspect_ratio,
                         influence=body.tailored_model_influence, negative_prompt=body.negative_prompt)
    return GenerationRequest(id=uuid.uuid4().hex, api="v2", owner=owner, model_id=model.id, checkpoint_step=step,
                             family=family, prompt=prompt, plain_prompt=prompt_text, structured_prompt=structured,
                             settings=settings)


def _legacy_request(service: Service, model_id: int, requested_step: int | None, body: TextToImageTailoredRequest,
                    owner: str) -> GenerationRequest:
    with service.db.transaction() as session:
        model, family, step = _generating_model(session, service, model_id, owner, fibo=False, step=requested_step)
    prefix = model.generation_prefix if body.include_generation_prefix else None
    prompt = service.family(family).prepare_prompt(body.prompt, prefix)
    settings = _settings(service, family, seed=body.seed, num_images=body.num_results, steps=body.steps_num,
                         guidance=None, aspect_ratio=body.aspect_ratio, influence=body.model_influence,
                         negative_prompt=body.negative_prompt)
    return GenerationRequest(id=uuid.uuid4().hex, api="v1", owner=owner, model_id=model.id, checkpoint_step=step,
                             family=family, prompt=prompt, settings=settings)


def _model_id(value: str | int) -> int:
    """Bria types tailored_model_id as a string; ids here are integers, so any other string names no model."""
    text = str(value).strip()
    if not text.isdecimal() or not 1 <= int(text) <= MAX_ID:
        raise NotFoundError(f"Model not found: there is no model {text[:40]!r}")
    return int(text)


def _generating_model(session: Session, service: Service, model_id: int, owner: str, *, fibo: bool,
                      step: int | None = None) -> tuple[Model, str, int]:
    """(model, family, checkpoint step) of a model this token may generate with, in Bria's order:
    404 (missing, or another token's), then 400 (wrong endpoint, not Completed, no such checkpoint)."""
    model = model_or_404(session, model_id)
    if model.owner is not None and model.owner != owner:
        raise NotFoundError(f"Model not found: there is no model {model_id}")  # another token's: not even its existence
    if is_fibo(model.training_version) != fibo:
        raise BadRequestError(
            f"model {model_id} is a {model.training_version!r} model: FIBO models generate through POST "
            "/v2/image/generate/tailored, legacy models (max, light, 3.2, 2.3) through POST "
            "/v1/text-to-image/tailored/{model_id}.")
    family = service.family_of(model.training_version)
    if model.status != "Completed":
        raise BadRequestError(f"The model status is not completed: model {model_id} is {model.status}; generate once "
                              "its training has completed.")
    if step is None:  # the active version: a chosen or the final checkpoint; "default" (fully_automated) is the final
        version = model.active_model_version
        step = int(version) if version.isdecimal() else int(model.training_parameters["total_training_steps"])
    else:
        exposed = checkpoint_steps(session, model)
        if str(step) not in exposed:
            existing = (f"its checkpoints: {', '.join(exposed)}" if exposed else
                        "a fully_automated model exposes no checkpoints; leave the step out of the path")
            raise BadRequestError(f"Checkpoint not found: model {model_id} has no checkpoint at step {step}; "
                                  f"{existing}.")
    published = session.scalar(select(Checkpoint.id).where(Checkpoint.model_id == model_id, Checkpoint.step == step))
    if published is None or not service.generations.lora_dir(model_id, step).is_dir():
        raise BadRequestError(f"Checkpoint not found: the LoRA of model {model_id} at step {step} is not on this "
                              "server.")
    return model, family, step


def _settings(service: Service, family: str, *, seed: int | None, **values: Any) -> dict[str, Any]:
    """GenerationSettings (validated) as the row stores them, at the operator's resolution."""
    if seed is None or seed < 0:
        seed = secrets.randbelow(RANDOM_SEEDS)
    values["negative_prompt"] = values["negative_prompt"] or None
    settings = GenerationSettings(seed=seed, resolution=service.settings.generation_resolution.get(family), **values)
    return asdict(settings)


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
    return [signed_url(service, request, f"{FILES_PREFIX}/generations/{job.id}/{name}")[0] for name in job.images]


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
