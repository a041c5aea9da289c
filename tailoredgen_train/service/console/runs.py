"""Console pages for models and their runs: create from a dataset, start (the contract's fields with
their defaults and ranges) and stop through models.py, as the API does; the run page with its live
progress, loss and learning-rate curves, samples beside the baseline, log tail and downloads."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy import select
from starlette.datastructures import FormData

from ... import strict_json
from ...contract import LR_SCHEDULERS, RANGES, REQUEST_FIELDS, defaults_for
from ...errors import NotFoundError, TailoredGenError
from ...report.metrics import finite_or_none, read_metrics
from ...report.samples import find_renders, read_prompts
from .. import models
from ..access import Caller
from ..datasets import project_or_404
from ..db import Dataset, Model, Project
from ..deps import file_inside, model_or_404, service_of
from ..runner import ACTIVE
from ..schemas import ModelCreate
from ..views import SAMPLE_FILE, dataset_view, model_view, progress_view, project_view
from .projects import dataset_page, fields
from .session import checked_form, console_caller, signed_in
from .web import PREFIX, SECURITY_HEADERS, ConsoleRoute, FormErrors, Id, form_id, page, redirect

router = APIRouter(route_class=ConsoleRoute)
LOG_LINES = 40
LABELS = {"rank": "LoRA rank", "learning_rate": "Learning rate", "lr_scheduler": "Learning-rate scheduler",
          "total_training_steps": "Total training steps", "checkpoint_interval": "Checkpoint interval",
          "lr_warmup_steps": "Warmup steps"}
HINTS = {"checkpoint_interval": "a checkpoint every N steps and at the last; left empty, it is capped at the total",
         "lr_warmup_steps": "used only by constant_with_warmup", "rank": "lora_alpha equals the rank"}


def contract_fields(training_version: str) -> list[dict[str, Any]]:
    """The Start Training fields as the contract defines them (contract.py): default and range."""
    defaults = defaults_for(training_version)
    rows = []
    for name in REQUEST_FIELDS:
        if name == "lr_scheduler":
            allowed = ", ".join(LR_SCHEDULERS)
        elif RANGES[name].high is None:
            allowed = f"≥ {RANGES[name].low:g} and ≤ total steps"
        else:
            allowed = f"{RANGES[name].low:g} – {RANGES[name].high:g}"
        rows.append({"name": name, "label": LABELS[name], "default": defaults[name], "allowed": allowed,
                     "hint": HINTS.get(name, ""), "choices": LR_SCHEDULERS if name == "lr_scheduler" else None})
    return rows


def start_fields(form: FormData) -> dict[str, Any]:
    """The start form as the JSON body an API client would send: empty inputs are omitted, numbers
    are JSON numbers, and anything else goes through as the text typed, for the contract to refuse."""
    body: dict[str, Any] = {}
    for name, value in fields(form, REQUEST_FIELDS).items():
        value = value.strip()
        if name != "lr_scheduler":
            try:
                number = strict_json.loads(value)
            except ValueError:
                number = None
            value = number if isinstance(number, (int, float)) and not isinstance(number, bool) else value
        body[name] = value
    return body


# ---- models --------------------------------------------------------------------------------------


@router.get("/models")
def list_models(request: Request, caller: Caller = Depends(console_caller)):
    service = service_of(request)
    with service.db.transaction() as session:
        found = session.scalars(caller.scope(select(Model).where(Model.status != "Deleted").order_by(Model.id)))
        rows = [model_view(session, m, include_training_parameters=False) for m in found]
        names = {p.id: p.project_name for p in session.scalars(caller.scope(select(Project)))}
        dataset_names = {d.id: d.name for d in session.scalars(caller.scope(select(Dataset)))}
    for row in rows:
        row["progress"] = progress_view(service.runner.run_dir(row["id"]), row["status"])
    return page(request, "models.html", title="Models", models=rows, project_names=names,
                dataset_names=dataset_names)


@router.post("/models")
def create_model(request: Request, caller: Caller = Depends(console_caller), form: FormData = Depends(checked_form)):
    values = fields(form, ("name", "dataset_id", "training_mode", "description"))
    try:
        model = models.create_model(service_of(request), ModelCreate(**values), caller)
    except (TailoredGenError, ValidationError) as exc:
        refused = FormErrors.of(exc)
        return dataset_page(request, caller, form_id(values.get("dataset_id")), status=refused.status,
                            model_form=values, refused=refused)
    return redirect(f"{PREFIX}/models/{model['id']}")


def run_page(request: Request, caller: Caller, model_id: int, *, status: int = 200, form: dict | None = None,
             refused: FormErrors | None = None):
    service = service_of(request)
    with service.db.transaction() as session:
        model = model_or_404(session, model_id, caller)
        view = model_view(session, model)
        # an uploaded model has no dataset, and a trained one outlives its deleted dataset
        found = session.get(Dataset, model.dataset_id) if model.dataset_id is not None else None
        dataset = dataset_view(session, found) if found is not None and caller.sees(found) else None
        project = project_view(project_or_404(session, model.project_id, caller))
    run_dir = service.runner.run_dir(model_id)
    downloads = {}
    for step in view["checkpoint_steps"]:
        downloads[int(step)] = models.download_link(service, request, model_id, int(step), caller)["download_url"]
    final = None
    if view["status"] == "Completed" and view["training_mode"] != "expert":
        final = models.download_link(service, request, model_id, None, caller)["download_url"]
    return page(request, "run.html", status=status, title=view["name"], model=view, dataset=dataset, project=project,
                progress=progress_view(run_dir, view["status"]), active=view["status"] in ACTIVE,
                contract=contract_fields(view["training_version"]), form=form or {},
                log=models.log_tail(service, model_id, LOG_LINES), final_download=final,
                **_samples_context(service, model_id, view, downloads),
                **(refused.context() if refused else {}))


def _samples_context(service, model_id: int, view: dict, downloads: dict[int, str]) -> dict:
    renders = []
    for render in find_renders(service.runner.run_dir(model_id)):
        prompts = read_prompts(render.folder)
        files = [p for p in prompts if isinstance(p.get("file"), str) and SAMPLE_FILE.fullmatch(p["file"])
                 and (render.folder / p["file"]).is_file()]
        renders.append({"step": render.step, "kind": render.kind, "samples": files})
    prompts = [_prompt_title(s.get("prompt")) for s in renders[0]["samples"]] if renders else []
    return {"renders": renders, "prompts": prompts, "downloads": downloads,
            "generate": view["status"] == "Completed"}


def _prompt_title(prompt: Any) -> str:
    """A sample's prompt, shortened for a column heading: a FIBO prompt's short_description."""
    text = prompt if isinstance(prompt, str) else ""
    try:
        parsed = strict_json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("short_description"), str):
        text = parsed["short_description"]
    return text if len(text) <= 160 else text[:157] + "..."


@router.get("/models/{model_id}")
def show_model(request: Request, model_id: Id, caller: Caller = Depends(console_caller)):
    return run_page(request, caller, model_id)


@router.post("/models/{model_id}/start")
def start_model(request: Request, model_id: Id, caller: Caller = Depends(console_caller),
                form: FormData = Depends(checked_form)):
    body = start_fields(form)
    try:
        models.start_model(service_of(request), model_id, body, caller)
    except TailoredGenError as exc:
        refused = FormErrors.of(exc)
        return run_page(request, caller, model_id, status=refused.status, form=body, refused=refused)
    return redirect(f"{PREFIX}/models/{model_id}")


@router.post("/models/{model_id}/stop")
def stop_model(request: Request, model_id: Id, caller: Caller = Depends(console_caller),
               form: FormData = Depends(checked_form)):
    try:
        models.stop_model(service_of(request), model_id, caller)
    except TailoredGenError as exc:
        refused = FormErrors.of(exc)
        return run_page(request, caller, model_id, status=refused.status, refused=refused)
    return redirect(f"{PREFIX}/models/{model_id}")


# ---- what the run page's script polls --------------------------------------------------------------


@router.get("/models/{model_id}/progress")
def model_progress(request: Request, model_id: Id, after: Annotated[int, Query(ge=-1)] = -1,
                   caller: Caller = Depends(console_caller)):
    """Status, progress, the curve points after step `after`, the render steps and the log tail."""
    service = service_of(request)
    with service.db.transaction() as session:
        model = model_or_404(session, model_id, caller)
        status, checkpoints = model.status, len(model_view(session, model)["checkpoint_steps"])
    run_dir = service.runner.run_dir(model_id)
    points = [[r["step"], finite_or_none(r.get("loss")), finite_or_none(r.get("lr")), bool(r.get("skipped"))]
              for r in read_metrics(run_dir) if r["step"] > after]
    body = {"status": status, "progress": progress_view(run_dir, status), "points": points,
            "renders": [r.step for r in find_renders(run_dir)], "checkpoints": checkpoints,
            "log": models.log_tail(service, model_id, LOG_LINES)}
    return JSONResponse(body, headers={"Cache-Control": "no-store"})


@router.get("/models/{model_id}/samples")
def samples_fragment(request: Request, model_id: Id, caller: Caller = Depends(console_caller)):
    """The samples table alone, which the run page swaps in when a new render lands."""
    service = service_of(request)
    with service.db.transaction() as session:
        model = model_or_404(session, model_id, caller)
        view = model_view(session, model)
    downloads = {int(s): models.download_link(service, request, model_id, int(s), caller)["download_url"]
                 for s in view["checkpoint_steps"]}
    return page(request, "_samples.html", model=view, **_samples_context(service, model_id, view, downloads))


@router.get("/models/{model_id}/renders/{step}/{file_name}")
def render_file(request: Request, model_id: Id, step: Annotated[int, PathParam(ge=0)],
                file_name: Annotated[str, PathParam(pattern=f"^{SAMPLE_FILE.pattern}$")],
                caller: Caller = Depends(signed_in)):
    """One sample image of the run (the baseline is step 0)."""
    service = service_of(request)
    with service.db.transaction() as session:
        model_or_404(session, model_id, caller)
    folder = next((r.folder for r in find_renders(service.runner.run_dir(model_id)) if r.step == step), None)
    if folder is None:
        raise NotFoundError(f"Not found: model {model_id} has no samples at step {step}")
    return FileResponse(file_inside(folder, file_name), media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300",
                                 "X-Content-Type-Options": SECURITY_HEADERS["X-Content-Type-Options"]})
