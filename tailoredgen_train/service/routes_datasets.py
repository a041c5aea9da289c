"""Projects, datasets and their images over HTTP; the rules live in datasets.py (the console calls
them too)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from sqlalchemy import select

from . import datasets
from .datasets import MAX_IMAGES, dataset_or_404, image_or_404, project_or_404
from .db import Dataset, Image, Project
from .deps import caller_of, service_of
from .schemas import (ERROR_RESPONSES, MAX_ID, BulkUploadRequest, BulkUploadStatusOut, CaptionUpdate, DatasetClone,
                      DatasetCreate, DatasetOut, DatasetUpdate, ImageOut, ProjectCreate, ProjectOut)
from .views import dataset_view, image_view, project_view

router = APIRouter(tags=["projects and datasets"], responses=ERROR_RESPONSES)
ProjectId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
DatasetId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]
ImageId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]


# ---- projects ----------------------------------------------------------------------------------


@router.post("/projects", status_code=201, response_model=ProjectOut)
def create_project(body: ProjectCreate, request: Request) -> dict:
    return datasets.create_project(service_of(request), body, caller_of(request))


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(request: Request) -> list[dict]:
    with service_of(request).db.read() as session:
        query = caller_of(request).scope(select(Project).order_by(Project.id))
        return [project_view(p) for p in session.scalars(query)]


@router.get("/projects/{project_id}", response_model=ProjectOut)
def get_project(project_id: ProjectId, request: Request) -> dict:
    with service_of(request).db.read() as session:
        return project_view(project_or_404(session, project_id, caller_of(request)))


@router.delete("/projects/{project_id}", status_code=204)
def delete_project(project_id: ProjectId, request: Request) -> Response:
    """Deletes the project, its datasets with their images, and its models (409 while one trains)."""
    datasets.delete_project(service_of(request), project_id, caller_of(request))
    return Response(status_code=204)


# ---- datasets ----------------------------------------------------------------------------------


@router.post("/datasets", status_code=201, response_model=DatasetOut, response_model_exclude_unset=True)
def create_dataset(body: DatasetCreate, request: Request) -> dict:
    return datasets.create_dataset(service_of(request), body, caller_of(request))


@router.get("/datasets", response_model=list[DatasetOut], response_model_exclude_unset=True)
def list_datasets(request: Request) -> list[dict]:
    with service_of(request).db.read() as session:
        query = caller_of(request).scope(select(Dataset).order_by(Dataset.id))
        return [dataset_view(session, d) for d in session.scalars(query)]


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, response_model_exclude_unset=True)
def get_dataset(dataset_id: DatasetId, request: Request,
                max_images: Annotated[int, Query(ge=1, le=MAX_IMAGES)] = MAX_IMAGES) -> dict:
    with service_of(request).db.read() as session:
        dataset = dataset_or_404(session, dataset_id, caller_of(request))
        images = list(session.scalars(select(Image).where(Image.dataset_id == dataset_id)
                                      .order_by(Image.id).limit(max_images)))
        return dataset_view(session, dataset, images=images)


@router.put("/datasets/{dataset_id}", response_model=DatasetOut, response_model_exclude_unset=True)
def update_dataset(dataset_id: DatasetId, body: DatasetUpdate, request: Request) -> dict:
    return datasets.update_dataset(service_of(request), dataset_id, body, caller_of(request))


@router.delete("/datasets/{dataset_id}", status_code=204)
def delete_dataset(dataset_id: DatasetId, request: Request) -> Response:
    """Deletes the dataset and its images (409 while a model trains on it); models trained on it stay."""
    datasets.delete_dataset(service_of(request), dataset_id, caller_of(request))
    return Response(status_code=204)


@router.post("/datasets/{dataset_id}/clone", status_code=201, response_model=DatasetOut,
             response_model_exclude_unset=True)
def clone_dataset(dataset_id: DatasetId, request: Request, body: DatasetClone | None = None) -> dict:
    """Clone Dataset As Draft: a draft copy with the images, captions, caption_prefix and visual_schema."""
    return datasets.clone_dataset(service_of(request), dataset_id, body or DatasetClone(), caller_of(request))


# ---- images ------------------------------------------------------------------------------------


@router.post("/datasets/{dataset_id}/images", status_code=201, response_model=ImageOut)
def upload_image(dataset_id: DatasetId, request: Request, file: Annotated[UploadFile, File()],
                 caption: Annotated[str | None, Form(max_length=100_000)] = None,
                 image_name: Annotated[str | None, Form(max_length=256)] = None) -> dict:
    return datasets.add_image(service_of(request), dataset_id, file.file, file.filename, caption, image_name,
                              caller_of(request))


@router.get("/datasets/{dataset_id}/images", response_model=list[ImageOut])
def list_images(dataset_id: DatasetId, request: Request) -> list[dict]:
    with service_of(request).db.read() as session:
        dataset_or_404(session, dataset_id, caller_of(request))
        return [image_view(i) for i in session.scalars(select(Image).where(Image.dataset_id == dataset_id)
                                                        .order_by(Image.id))]


@router.post("/datasets/{dataset_id}/images/bulk-upload", status_code=202, response_model=BulkUploadStatusOut)
def bulk_upload(dataset_id: DatasetId, body: BulkUploadRequest, request: Request) -> dict:
    """Advanced upload: a zip of up to 5000 images into an empty advanced draft dataset, in the background.
    Poll GET .../bulk-upload/status."""
    return service_of(request).bulk_uploads.start(dataset_id, body, caller_of(request))


@router.get("/datasets/{dataset_id}/images/bulk-upload/status", response_model=BulkUploadStatusOut)
def bulk_upload_status(dataset_id: DatasetId, request: Request) -> dict:
    return service_of(request).bulk_uploads.status(dataset_id, caller_of(request))


@router.get("/datasets/{dataset_id}/images/{image_id}", response_model=ImageOut)
def get_image(dataset_id: DatasetId, image_id: ImageId, request: Request) -> dict:
    with service_of(request).db.read() as session:
        return image_view(image_or_404(session, dataset_id, image_id, caller_of(request)))


@router.put("/datasets/{dataset_id}/images/{image_id}", response_model=ImageOut)
def update_caption(dataset_id: DatasetId, image_id: ImageId, body: CaptionUpdate, request: Request) -> dict:
    return datasets.update_caption(service_of(request), dataset_id, image_id, body, caller_of(request))


@router.delete("/datasets/{dataset_id}/images/{image_id}", status_code=204)
def delete_image(dataset_id: DatasetId, image_id: ImageId, request: Request) -> Response:
    datasets.delete_image(service_of(request), dataset_id, image_id, caller_of(request))
    return Response(status_code=204)
