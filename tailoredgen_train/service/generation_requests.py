"""What a generation request asks for, shared by Bria's /v2 and /v1 endpoints and the console: the
model lookup in Bria's order, the prompt, the settings. The result is a GenerationRequest row for
the generation worker (generation.py), which renders it.

Any token of the model's organization generates with it. Another organization's model answers
/v2 with 403 "Model does not belong to organization" (Bria's documented answer) and /v1 with 404.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import asdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..contract import is_fibo
from ..errors import ForbiddenError, InvalidParameterError, NotFoundError, PromptError
from ..inference import GenerationSettings
from .access import Caller
from .core import Service
from .db import Checkpoint, GenerationRequest, Model
from .deps import BadRequestError, model_or_404
from .schemas import MAX_ID, GenerateTailoredRequest, TextToImageTailoredRequest
from .views import checkpoint_steps, final_step

RANDOM_SEEDS = 2**31  # a request without a seed draws one below this (and answers with it)
NO_EXPANDER = ("A plain-text prompt needs a captioning model to expand it into a FIBO structured prompt, and none "
               "is configured on this server (the operator enables one with `tailoredgen-train serve --vlm "
               "briaai/FIBO-vlm`). Send structured_prompt instead: a JSON object as a string, e.g. "
               '{"short_description": "a red fox in fresh snow", "background_setting": "a pine forest"}.')


def fibo_request(service: Service, body: GenerateTailoredRequest, caller: Caller,
                 step: int | None = None) -> GenerationRequest:
    """POST /v2/image/generate/tailored, at the model's active version or (the console) at `step`."""
    model_id = model_id_of(body.tailored_model_id)
    with service.db.transaction() as session:
        model, family, step = generating_model(session, service, model_id, caller, fibo=True, step=step)
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
    return GenerationRequest(id=uuid.uuid4().hex, api="v2", owner=caller.token_id, org=caller.organization,
                             model_id=model.id, checkpoint_step=step, family=family, prompt=prompt,
                             plain_prompt=prompt_text, structured_prompt=structured, settings=settings)


def legacy_request(service: Service, model_id: int, requested_step: int | None, body: TextToImageTailoredRequest,
                   caller: Caller) -> GenerationRequest:
    """POST /v1/text-to-image/tailored/{model_id}[/{step}]."""
    with service.db.transaction() as session:
        model, family, step = generating_model(session, service, model_id, caller, fibo=False, step=requested_step)
    prefix = model.generation_prefix if body.include_generation_prefix else None
    prompt = service.family(family).prepare_prompt(body.prompt, prefix)
    settings = _settings(service, family, seed=body.seed, num_images=body.num_results, steps=body.steps_num,
                         guidance=None, aspect_ratio=body.aspect_ratio, influence=body.model_influence,
                         negative_prompt=body.negative_prompt)
    return GenerationRequest(id=uuid.uuid4().hex, api="v1", owner=caller.token_id, org=caller.organization,
                             model_id=model.id, checkpoint_step=step, family=family, prompt=prompt, settings=settings)


def model_id_of(value: str | int) -> int:
    """Bria types tailored_model_id as a string; ids here are integers, so any other string names no model."""
    text = str(value).strip()
    if not text.isdecimal() or not 1 <= int(text) <= MAX_ID:
        raise NotFoundError(f"Model not found: there is no model {text[:40]!r}")
    return int(text)


def generating_model(session: Session, service: Service, model_id: int, caller: Caller, *, fibo: bool,
                     step: int | None = None) -> tuple[Model, str, int]:
    """(model, family, checkpoint step) of a model this caller may generate with, in Bria's order:
    404 (missing), 403 on /v2 for another organization's (404 on /v1, which documents no 403), then
    400 (wrong endpoint, not Completed, no such checkpoint)."""
    found = session.get(Model, model_id)
    if fibo and found is not None and found.status != "Deleted" and not caller.sees(found):
        raise ForbiddenError("Model does not belong to organization")
    model = model_or_404(session, model_id, caller)
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
        step = int(version) if version.isdecimal() else final_step(model)
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


def own_generation(service: Service, request_id: str, caller: Caller) -> GenerationRequest:
    """A generation request of this caller's organization (GET /v2/status/{id}); another's is a 404."""
    job = service.generations.load(request_id)
    if job is None or not caller.sees(job):
        raise NotFoundError(f"Request not found: there is no generation request {request_id}")
    return job
