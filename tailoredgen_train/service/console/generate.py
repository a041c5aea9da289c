"""The console's Generate page: a completed model the caller may generate with, one of its
checkpoints, a prompt (FIBO: a structured prompt, or text when the server can expand it), seed,
aspect ratio and influence. The form's fields are the API's (/v2 for FIBO, /v1 for legacy models),
validated by the same request schemas and turned into a request by generation_requests.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import select
from starlette.datastructures import FormData

from ...contract import ASPECT_RATIOS, is_fibo
from ...errors import TailoredGenError
from ..access import Caller
from ..db import Model
from ..deps import file_inside, model_or_404, service_of
from ..generation import COMPLETED, FAILED
from ..generation_requests import fibo_request, legacy_request, own_generation
from ..schemas import MAX_ID, GenerateTailoredRequest, TextToImageTailoredRequest
from ..views import checkpoint_steps
from .projects import fields, textarea
from .session import checked_form, console_caller, signed_in
from .web import PREFIX, ConsoleRoute, FormErrors, form_id, page, redirect

router = APIRouter(route_class=ConsoleRoute)
RequestId = Annotated[str, PathParam(pattern="^[0-9a-f]{32}$")]
FIBO_FIELDS = ("seed", "aspect_ratio", "tailored_model_influence", "steps_num", "guidance_scale")
LEGACY_FIELDS = ("seed", "aspect_ratio", "model_influence", "steps_num")


def _generate_page(request: Request, caller: Caller, model_id: int | None, step: str | None, *, status: int = 200,
                   form: dict | None = None, refused: FormErrors | None = None):
    service = service_of(request)
    with service.db.transaction() as session:
        query = caller.scope(select(Model).where(Model.status == "Completed").order_by(Model.id.desc()))
        usable = list(session.scalars(query))
        chosen = next((m for m in usable if m.id == model_id), usable[0] if usable else None)
        steps = checkpoint_steps(session, chosen) if chosen is not None else []
        choice = None
        if chosen is not None:
            version = chosen.active_model_version
            choice = step if step in steps else (version if version in steps else (steps[0] if steps else None))
            chosen = {"id": chosen.id, "name": chosen.name, "fibo": is_fibo(chosen.training_version),
                      "training_version": chosen.training_version, "generation_prefix": chosen.generation_prefix}
        usable = [{"id": m.id, "name": m.name, "training_version": m.training_version} for m in usable]
    return page(request, "generate.html", status=status, title="Generate", models=usable, model=chosen,
                steps=steps, step=choice, aspect_ratios=ASPECT_RATIOS, form=form or {},
                expander=service.prompt_expander is not None, **(refused.context() if refused else {}))


@router.get("/generate")
def generate_form(request: Request, model_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
                  step: Annotated[str | None, Query(max_length=12)] = None, caller: Caller = Depends(console_caller)):
    return _generate_page(request, caller, model_id, step)


@router.post("/generate")
def generate(request: Request, caller: Caller = Depends(console_caller), form: FormData = Depends(checked_form)):
    service = service_of(request)
    model_id = form_id(form.get("model_id"))
    step_text = form.get("step") or ""
    step = int(step_text) if isinstance(step_text, str) and step_text.isdecimal() else None
    with service.db.transaction() as session:
        fibo = is_fibo(model_or_404(session, model_id, caller).training_version)
    if fibo:
        values = fields(form, FIBO_FIELDS)
        for name in ("structured_prompt", "prompt"):
            if (text := textarea(form, name)) and text.strip():
                values[name] = text
    else:
        values = {**fields(form, LEGACY_FIELDS), "prompt": textarea(form, "prompt") or "", "num_results": 1,
                  "include_generation_prefix": form.get("include_generation_prefix") == "on"}
    try:
        if fibo:
            job = fibo_request(service, GenerateTailoredRequest(tailored_model_id=str(model_id), **values), caller,
                               step)
        else:
            job = legacy_request(service, model_id, step, TextToImageTailoredRequest(**values), caller)
        service.generations.enqueue(job)
    except (TailoredGenError, ValidationError) as exc:
        refused = FormErrors.of(exc)
        return _generate_page(request, caller, model_id, step_text, status=refused.status, form=values,
                              refused=refused)
    return redirect(f"{PREFIX}/generations/{job.id}")


@router.get("/generations/{request_id}")
def show_generation(request: Request, request_id: RequestId, caller: Caller = Depends(console_caller)):
    job = own_generation(service_of(request), request_id, caller)
    return page(request, "generation.html", title="Generation", job=job, completed=job.status == COMPLETED,
                failed=job.status == FAILED)


@router.get("/generations/{request_id}/{file_name}")
def generation_file(request: Request, request_id: RequestId,
                    file_name: Annotated[str, PathParam(pattern=r"^[0-9]{2,3}\.png$")],
                    caller: Caller = Depends(signed_in)):
    service = service_of(request)
    own_generation(service, request_id, caller)
    return FileResponse(file_inside(service.generations.folder(request_id), file_name), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})
