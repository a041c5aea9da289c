"""Rendering console pages: the Jinja2 templates (autoescaped: no user text reaches a page
unescaped), the security headers every page carries, and the route class that turns errors into
pages (a refused form keeps the API's status code and message)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Callable
from urllib.parse import quote

from fastapi import Path as PathParam
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from pydantic import ValidationError
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ...errors import InvalidParameterError, NotFoundError, RateLimitedError, TailoredGenError
from ..schemas import MAX_ID, field_errors
from .session import CSRF_FIELD, SignInRequired, csrf_token, set_cookies

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
PREFIX = "/console"
# pages load only their own stylesheet, script and images; nothing inline, nothing from elsewhere
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def pretty_caption(caption: str | None) -> str:
    """A stored FIBO caption (compact, ASCII-escaped JSON) as indented, readable JSON for its editor."""
    if not caption:
        return ""
    try:
        return json.dumps(json.loads(caption), indent=2, ensure_ascii=False)
    except ValueError:
        return caption


Id = Annotated[int, PathParam(ge=1, le=MAX_ID)]
"""An id in a console path: what the API accepts; anything else is a 404 page."""


def form_id(value: Any) -> int:
    """An id sent in a form field, or NotFoundError."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if not 1 <= number <= MAX_ID:
        raise NotFoundError(f"Not found: {str(value)[:40]!r} is not an id")
    return number


_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["duration"] = _duration
_env.filters["pretty_caption"] = pretty_caption


def page(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("signed_in", getattr(request.state, "caller", None) is not None)
    context.setdefault("errors", {})
    context.setdefault("message", None)
    html = _env.get_template(template).render(prefix=PREFIX, csrf_field=CSRF_FIELD, csrf=csrf_token(request),
                                              path=request.url.path, **context)
    return set_cookies(request, HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS))


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


class FormErrors:
    """What a refused form shows: the API's status, its message, and each field's message by name."""

    def __init__(self, status: int, message: str, fields: dict[str, str]):
        self.status, self.message, self.fields = status, message, fields

    @classmethod
    def of(cls, exc: TailoredGenError | ValidationError) -> FormErrors:
        if isinstance(exc, ValidationError):  # the request schema refused it, as the API's 400 does
            exc = InvalidParameterError(field_errors(list(exc.errors())))
        fields: dict[str, str] = {}
        if not isinstance(exc, InvalidParameterError):
            return cls(exc.http_status, exc.message, fields)
        for error in exc.errors:  # each field's message goes beside its input, and all of them at the top
            fields.setdefault(error.field_name, error.msg)
        summary = "; ".join(f"{name}: {msg}" for name, msg in fields.items())
        return cls(exc.http_status, f"Please correct the form. {summary}", fields)

    def context(self) -> dict[str, Any]:
        return {"message": self.message, "errors": self.fields}


def error_page(request: Request, exc: TailoredGenError) -> Response:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimitedError) else {}
    status = exc.http_status if exc.http_status < 500 else 500
    message = exc.message if exc.http_status < 500 else "Internal server error"
    response = page(request, "error.html", status=status, title="Error", message=message)
    response.headers.update(headers)
    return response


class ConsoleRoute(APIRoute):
    """A console route: signed-out visitors are sent to the sign-in page, and errors become pages."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return redirect(f"{PREFIX}/sign-in?next={quote(target, safe='')}" if request.method == "GET"
                                else f"{PREFIX}/sign-in")
            except RequestValidationError:  # a path or query that names nothing (/console/datasets/abc)
                return error_page(request, NotFoundError("Not found: this page does not exist."))
            except TailoredGenError as exc:
                return error_page(request, exc)

        return guarded
