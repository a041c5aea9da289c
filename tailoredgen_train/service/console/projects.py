"""Console pages for projects, datasets and their images. Every change goes through datasets.py,
the functions the API's handlers call: a form refuses exactly what the API refuses, with its message."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import func, select
from starlette.datastructures import FormData, UploadFile

from ...contract import is_fibo
from ...errors import TailoredGenError
from .. import captions, datasets
from ..access import Caller
from ..datasets import PreflightFailedError, dataset_or_404, image_or_404, project_or_404
from ..db import Dataset, Image, Model, Project
from ..deps import service_of
from ..schemas import IP_MEDIUMS, IP_TYPES, CaptionUpdate, DatasetCreate, DatasetUpdate, ProjectCreate
from ..views import dataset_view, image_view, model_view, project_view
from .session import checked_form, console_caller, signed_in
from .thumbnails import thumbnail
from .web import PREFIX, ConsoleRoute, FormErrors, Id, form_id, page, pretty_caption, redirect

router = APIRouter(route_class=ConsoleRoute)


def fields(form: FormData, names: tuple[str, ...]) -> dict[str, Any]:
    """The form's non-empty text fields among `names`: an empty input is an omitted field, as in the API."""
    return {n: v for n in names if isinstance(v := form.get(n), str) and v != ""}


def textarea(form: FormData, name: str) -> str | None:
    # browsers submit a textarea's line breaks as CRLF (HTML's rule); the API receives what was typed
    value = form.get(name)
    return value.replace("\r\n", "\n") if isinstance(value, str) else None


# ---- projects ------------------------------------------------------------------------------------


def _projects_page(request: Request, caller: Caller, *, status: int = 200, form: dict | None = None,
                   refused: FormErrors | None = None):
    with service_of(request).db.transaction() as session:
        projects = [project_view(p) for p in session.scalars(caller.scope(select(Project).order_by(Project.id)))]
        per_project = select(Dataset.project_id, func.count()).group_by(Dataset.project_id)
        counts = dict(session.execute(caller.scope(per_project)).all())
    return page(request, "projects.html", status=status, title="Projects", projects=projects, dataset_counts=counts,
                form=form or {}, ip_mediums=IP_MEDIUMS, ip_types=IP_TYPES, **(refused.context() if refused else {}))


@router.get("/projects")
def list_projects(request: Request, caller: Caller = Depends(console_caller)):
    return _projects_page(request, caller)


@router.post("/projects")
def create_project(request: Request, caller: Caller = Depends(console_caller), form: FormData = Depends(checked_form)):
    values = fields(form, ("project_name", "project_description", "ip_name", "ip_description", "ip_medium",
                           "ip_type"))
    try:
        project = datasets.create_project(service_of(request), ProjectCreate(**values), caller)
    except (TailoredGenError, ValidationError) as exc:
        refused = FormErrors.of(exc)
        return _projects_page(request, caller, status=refused.status, form=values, refused=refused)
    return redirect(f"{PREFIX}/projects/{project['id']}")


def _project_page(request: Request, caller: Caller, project_id: int, *, status: int = 200, form: dict | None = None,
                  refused: FormErrors | None = None):
    service = service_of(request)
    with service.db.transaction() as session:
        project = project_view(project_or_404(session, project_id, caller))
        found = session.scalars(caller.scope(select(Dataset).where(Dataset.project_id == project_id)
                                             .order_by(Dataset.id)))
        dataset_views = [dataset_view(session, d) for d in found]
        found = session.scalars(caller.scope(select(Model).where(Model.project_id == project_id,
                                                                 Model.status != "Deleted").order_by(Model.id)))
        model_views = [model_view(session, m, include_training_parameters=False) for m in found]
    return page(request, "project.html", status=status, title=project["project_name"], project=project,
                datasets=dataset_views, models=model_views, versions=service.served_versions(), form=form or {},
                **(refused.context() if refused else {}))


@router.get("/projects/{project_id}")
def show_project(request: Request, project_id: Id, caller: Caller = Depends(console_caller)):
    return _project_page(request, caller, project_id)


# ---- datasets ------------------------------------------------------------------------------------


@router.post("/datasets")
def create_dataset(request: Request, caller: Caller = Depends(console_caller), form: FormData = Depends(checked_form)):
    values = fields(form, ("project_id", "name", "training_version", "caption_prefix"))
    try:
        dataset = datasets.create_dataset(service_of(request), DatasetCreate(**values), caller)
    except (TailoredGenError, ValidationError) as exc:
        refused = FormErrors.of(exc)
        return _project_page(request, caller, form_id(values.get("project_id")), status=refused.status, form=values,
                             refused=refused)
    return redirect(f"{PREFIX}/datasets/{dataset['id']}")


def dataset_page(request: Request, caller: Caller, dataset_id: int, *, status: int = 200,
                 uploads: list[dict] | None = None, report: Any = None, completion: str | None = None,
                 edited: dict[int, tuple[str, str]] | None = None, model_form: dict | None = None,
                 schema_form: dict | None = None, captioning: str | None = None, refused: FormErrors | None = None):
    """The dataset page; what a refused form left: `uploads` (per-file results), `report` (the
    preflight's findings), `completion` (why it could not be completed), `edited` (image id ->
    (the caption as sent, why it was refused)), `schema_form` (the visual schema as sent),
    `captioning` (why Regenerate all captions was refused), `model_form` and `refused` (the
    refused form's fields)."""
    service = service_of(request)
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id, caller)
        view = dataset_view(session, dataset)
        project = project_view(project_or_404(session, dataset.project_id, caller))
        rows = list(session.scalars(select(Image).where(Image.dataset_id == dataset_id).order_by(Image.id)))
        images = [{**image_view(i), "file_name": i.file_name} for i in rows]
        found = session.scalars(caller.scope(select(Model).where(Model.dataset_id == dataset_id,
                                                                 Model.status != "Deleted").order_by(Model.id)))
        model_views = [model_view(session, m, include_training_parameters=False) for m in found]
    by_file = {i["file_name"]: i for i in images}
    findings = []
    if report is not None:
        for problem, note in [(p, False) for p in report.problems] + [(n, True) for n in report.notes]:
            image = by_file.get(problem.file)
            findings.append({"file": problem.file, "reason": problem.reason, "detail": problem.detail, "note": note,
                             "image_id": image["id"] if image else None,
                             "image_name": image["image_name"] if image else problem.file})
    return page(request, "dataset.html", status=status, title=view["name"], dataset=view, project=project,
                images=images, models=model_views, fibo=is_fibo(view["training_version"]),
                sources=Counter(i["caption_source"] or "none" for i in images), uploads=uploads, findings=findings,
                completion=completion, edited=edited or {}, captioner=service.captioning.enabled,
                schema_form=schema_form or {"visual_schema": pretty_caption(view["visual_schema"])},
                captioning=captioning,
                model_form=model_form or {"training_mode": "expert"},
                min_side=service.engine_config(service.family_of(view["training_version"])).data.min_side,
                **(refused.context() if refused else {}))


@router.get("/datasets/{dataset_id}")
def show_dataset(request: Request, dataset_id: Id, caller: Caller = Depends(console_caller)):
    return dataset_page(request, caller, dataset_id)


@router.post("/datasets/{dataset_id}/images")
def upload_images(request: Request, dataset_id: Id, caller: Caller = Depends(console_caller),
                  form: FormData = Depends(checked_form)):
    """Several files in one form; each is added as POST /datasets/{id}/images adds one, and the page
    lists each file's result (the API's error code and message when it was refused)."""
    service = service_of(request)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile) and f.filename]
    if not files:
        return dataset_page(request, caller, dataset_id, status=400,
                            uploads=[{"file": "", "ok": False, "code": "no_file",
                                      "message": "Choose one or more images (jpg, png or webp) to upload."}])
    results = []
    for upload in files:
        try:
            image = datasets.add_image(service, dataset_id, upload.file, upload.filename, None, None, caller)
            results.append({"file": upload.filename, "ok": True, "image_id": image["id"]})
        except TailoredGenError as exc:
            results.append({"file": upload.filename, "ok": False, "code": exc.code, "message": exc.message,
                            "status": exc.http_status})
    failed = [r for r in results if not r["ok"]]
    status = failed[0]["status"] if len(failed) == len(results) else 200
    return dataset_page(request, caller, dataset_id, status=status, uploads=results)


@router.get("/datasets/{dataset_id}/images/{image_id}/thumbnail")
def image_thumbnail(request: Request, dataset_id: Id, image_id: Id, caller: Caller = Depends(signed_in)):
    service = service_of(request)
    with service.db.transaction() as session:
        image = image_or_404(session, dataset_id, image_id, caller)
    return FileResponse(thumbnail(service, image), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})


@router.post("/datasets/{dataset_id}/images/{image_id}/caption")
def save_caption(request: Request, dataset_id: Id, image_id: Id, caller: Caller = Depends(console_caller),
                 form: FormData = Depends(checked_form)):
    text = textarea(form, "caption") or ""
    try:
        datasets.update_caption(service_of(request), dataset_id, image_id, CaptionUpdate(caption=text), caller)
    except (TailoredGenError, ValidationError) as exc:
        refused = FormErrors.of(exc)
        why = refused.fields.get("caption") or refused.message
        return dataset_page(request, caller, dataset_id, status=refused.status, edited={image_id: (text, why)},
                            refused=refused)
    return redirect(f"{PREFIX}/datasets/{dataset_id}#image-{image_id}")


@router.post("/datasets/{dataset_id}/images/{image_id}/regenerate")
def regenerate_caption(request: Request, dataset_id: Id, image_id: Id, caller: Caller = Depends(console_caller),
                       form: FormData = Depends(checked_form)):
    """PUT /datasets/{id}/images/{image_id} {"regenerate_caption": true}, through the same function."""
    try:
        datasets.update_caption(service_of(request), dataset_id, image_id, CaptionUpdate(regenerate_caption=True),
                                caller)
    except TailoredGenError as exc:
        refused = FormErrors.of(exc)
        with service_of(request).db.transaction() as session:
            caption = image_or_404(session, dataset_id, image_id, caller).caption or ""
        return dataset_page(request, caller, dataset_id, status=refused.status, refused=refused,
                            edited={image_id: (caption, next(iter(refused.fields.values()), refused.message))})
    return redirect(f"{PREFIX}/datasets/{dataset_id}#image-{image_id}")


@router.post("/datasets/{dataset_id}/images/{image_id}/delete")
def delete_image(request: Request, dataset_id: Id, image_id: Id, caller: Caller = Depends(console_caller),
                 form: FormData = Depends(checked_form)):
    try:
        datasets.delete_image(service_of(request), dataset_id, image_id, caller)
    except TailoredGenError as exc:
        return dataset_page(request, caller, dataset_id, status=exc.http_status, completion=exc.message)
    return redirect(f"{PREFIX}/datasets/{dataset_id}")


@router.post("/datasets/{dataset_id}/captions/regenerate")
def regenerate_all_captions(request: Request, dataset_id: Id, caller: Caller = Depends(console_caller),
                            form: FormData = Depends(checked_form)):
    """PUT /datasets/{id}/images (Regenerate All Captions): every image is queued for the captioning worker."""
    try:
        captions.regenerate_captions(service_of(request), dataset_id, caller)
    except TailoredGenError as exc:
        return dataset_page(request, caller, dataset_id, status=exc.http_status, captioning=exc.message)
    return redirect(f"{PREFIX}/datasets/{dataset_id}#images-title")


@router.post("/datasets/{dataset_id}/visual-schema")
def set_visual_schema(request: Request, dataset_id: Id, caller: Caller = Depends(console_caller),
                      form: FormData = Depends(checked_form)):
    """PUT /datasets/{id} {"visual_schema": ...}: the caption values every automatic caption keeps."""
    text = textarea(form, "visual_schema") or ""
    try:
        datasets.update_dataset(service_of(request), dataset_id, DatasetUpdate(visual_schema=text), caller)
    except (TailoredGenError, ValidationError) as exc:
        refused = FormErrors.of(exc)
        return dataset_page(request, caller, dataset_id, status=refused.status, schema_form={"visual_schema": text},
                            refused=refused)
    return redirect(f"{PREFIX}/datasets/{dataset_id}")


@router.post("/datasets/{dataset_id}/complete")
def complete_dataset(request: Request, dataset_id: Id, caller: Caller = Depends(console_caller),
                     form: FormData = Depends(checked_form)):
    """PUT /datasets/{id} {"status": "completed"}: the preflight's findings are listed when it refuses."""
    try:
        datasets.update_dataset(service_of(request), dataset_id, DatasetUpdate(status="completed"), caller)
    except PreflightFailedError as exc:
        return dataset_page(request, caller, dataset_id, status=exc.http_status, report=exc.report,
                            completion=exc.message.splitlines()[0])
    except TailoredGenError as exc:
        return dataset_page(request, caller, dataset_id, status=exc.http_status, completion=exc.message)
    return redirect(f"{PREFIX}/datasets/{dataset_id}")
