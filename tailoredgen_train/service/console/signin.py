"""Signing in and out of the console, and its home page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import FormData

from ...errors import UnauthorizedError
from ..deps import service_of
from .session import SignInRequired, checked_form, sign_in, sign_out, signed_in
from .web import PREFIX, ConsoleRoute, page, redirect

router = APIRouter(route_class=ConsoleRoute)


def _next(target: str | None) -> str:
    """Where to go after signing in: a console page, never another site (no open redirect)."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/projects"


@router.get("/")
def home(request: Request):
    return redirect(f"{PREFIX}/projects")


@router.get("/sign-in")
def sign_in_form(request: Request, next: Annotated[str | None, Query(max_length=2000)] = None):
    try:
        signed_in(request)
        return redirect(_next(next))
    except SignInRequired:
        return page(request, "sign_in.html", title="Sign in", next=_next(next))


@router.post("/sign-in")
def sign_in_submit(request: Request, form: FormData = Depends(checked_form)):
    token = form.get("api_token")
    target = _next(form.get("next") if isinstance(form.get("next"), str) else None)
    try:
        service_of(request).auth.check(token if isinstance(token, str) else None)
    except UnauthorizedError:
        return page(request, "sign_in.html", status=401, title="Sign in", next=target,
                    message="Unauthorized: this API token is not valid on this server. Paste a token the operator "
                            "configured (TAILOREDGEN_API_TOKENS or --tokens-file).")
    response = redirect(target)
    sign_in(request, response, token)
    return response


@router.post("/sign-out")
def sign_out_submit(request: Request, form: FormData = Depends(checked_form)):
    response = redirect(f"{PREFIX}/sign-in")
    sign_out(request, response)
    return response
