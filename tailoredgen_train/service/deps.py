"""What the routes share: the service lookup, the api_token dependency, the response class, the
errors several routes raise, the model lookup and pre-signed links. Routes import this module,
never app.py (which imports the routes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session

from ..errors import NotFoundError, TailoredGenError
from .access import Caller
from .core import Service
from .db import Model

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


def service_of(request: Request) -> Service:
    return request.app.state.service


def authenticate(service: Service, api_token: str | None) -> str:
    """The token's id, once the token is checked and counted against its request rate (401, 429)."""
    who = service.auth.check(api_token)
    service.limiter.check(who)
    return who


def caller(request: Request, api_token: str | None = Header(default=None, alias="api_token",
                                                             convert_underscores=False)) -> str:
    """The caller's token id. The request guard (limits.py) authenticated the api_token header before
    the body was read; a route it does not cover is authenticated here."""
    who = getattr(request.state, "caller", None)
    if who is None:
        who = request.state.caller = authenticate(service_of(request), api_token)
    return who


def caller_of(request: Request) -> Caller:
    """The authenticated caller of a request that went through `caller` (or the console's sign-in)."""
    who = request.state.caller
    return Caller(who, service_of(request).auth.organization_of(who))


def model_or_404(session: Session, model_id: int, caller: Caller) -> Model:
    model = session.get(Model, model_id)
    if model is None or model.status == "Deleted" or not caller.sees(model):
        raise NotFoundError(f"Model not found: there is no model {model_id}")
    return model


def public_base_url(service: Service, request: Request) -> str:
    """Where clients reach this service: --public-url, else the request's own base URL."""
    return (service.settings.public_url or str(request.base_url)).rstrip("/")


def signed_url(service: Service, request: Request, path: str, organization: str) -> tuple[str, int]:
    """A pre-signed link to `path` (under FILES_PREFIX), bound to the organization that owns the
    file, and its expiry (Unix time)."""
    expires, signature = service.signer.sign(path, service.settings.download_url_ttl_s, organization)
    return f"{public_base_url(service, request)}{path}?expires={expires}&signature={signature}", expires


def file_inside(folder: Path, name: str) -> Path:
    """folder/name when it is a file that resolves inside folder (no symlink out of it); else a 404."""
    path = folder / name
    try:
        inside = path.resolve(strict=True).is_relative_to(folder.resolve(strict=True))
    except OSError:
        inside = False
    if not inside or not path.is_file():
        raise NotFoundError(f"the file {name} no longer exists")
    return path
