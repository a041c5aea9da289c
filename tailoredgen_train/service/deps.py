"""What the routes share: the service lookup, the api_token dependency, the response class, the
errors several routes raise, the dataset, image and model lookups and pre-signed links. Routes
import this module, never app.py (which imports the routes)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from ..errors import NotFoundError, TailoredGenError
from .db import Dataset, Image, Model

if TYPE_CHECKING:  # core imports the captioning functions, which import this module
    from .core import Service

FILES_PREFIX = "/tailored-gen/files"
"""Pre-signed files live under here; their signature is the credential (no api_token)."""


class AsciiJSONResponse(JSONResponse):
    """Escapes non-ASCII, so that no text a client sent (a lone surrogate included) can break a response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class BadRequestError(TailoredGenError):
    """A 400 whose body is {"message": ...} (Bria uses it for requests that are wrong as a whole)."""

    code = "bad_request"
    http_status = 400


class ConflictError(TailoredGenError):
    code = "conflict"
    http_status = 409


class UnsupportedImageError(TailoredGenError):
    code = "unsupported_image"
    http_status = 415


class UploadTooLargeError(TailoredGenError):
    code = "upload_too_large"
    http_status = 413


def service_of(request: Request) -> Service:
    return request.app.state.service


def caller(request: Request, api_token: str | None = Header(default=None, alias="api_token",
                                                             convert_underscores=False)) -> str:
    """Authenticates the api_token header and applies the token's request rate; the token's id."""
    service = service_of(request)
    who = service.auth.check(api_token)
    request.state.caller = who
    service.limiter.check(who)
    return who


def dataset_or_404(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise NotFoundError(f"Dataset not found: there is no dataset {dataset_id}")
    return dataset


def image_or_404(session: Session, dataset_id: int, image_id: int) -> Image:
    dataset_or_404(session, dataset_id)
    image = session.get(Image, image_id)
    if image is None or image.dataset_id != dataset_id:
        raise NotFoundError(f"Image not found: dataset {dataset_id} has no image {image_id}")
    return image


def require_draft(dataset: Dataset, what: str) -> None:
    """A completed dataset is frozen (409)."""
    if dataset.status != "draft":
        raise ConflictError(f"Cannot {what} in a completed dataset ({dataset.id}): a completed dataset is frozen. "
                            "Create a new dataset to change its images or captions.")


def model_or_404(session: Session, model_id: int) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.status == "Deleted":
        raise NotFoundError(f"Model not found: there is no model {model_id}")
    return model


def public_base_url(service: Service, request: Request) -> str:
    """Where clients reach this service: --public-url, else the request's own base URL."""
    return (service.settings.public_url or str(request.base_url)).rstrip("/")


def signed_url(service: Service, request: Request, path: str) -> tuple[str, int]:
    """A pre-signed link to `path` (under FILES_PREFIX) and its expiry (Unix time)."""
    expires, signature = service.signer.sign(path, service.settings.download_url_ttl_s)
    return f"{public_base_url(service, request)}{path}?expires={expires}&signature={signature}", expires
