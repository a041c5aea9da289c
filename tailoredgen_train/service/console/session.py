"""Signing in to the console: the API token in a cookie, the caller it names, and CSRF tokens.

Two cookies, both HttpOnly (no script reads them), SameSite=Strict (a browser sends neither with a
request another site starts, links followed from mail included: those land on the sign-in page),
Path=/console, Secure when the console is served over https:

    tg_console_sid     a random session id, created on the first page; rotated at sign-in and sign-out
    tg_console_token   the API token, set by signing in; checked like the api_token header on every request

Every form carries a CSRF token, HMAC(url secret, session id): signed per session, so a page from
another session (or none) cannot post, and a POST without it is refused with 403.
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request
from starlette.datastructures import FormData
from starlette.responses import Response

from ...errors import TailoredGenError, UnauthorizedError
from ..access import Caller
from ..deps import service_of

SESSION_COOKIE = "tg_console_sid"
TOKEN_COOKIE = "tg_console_token"
CSRF_FIELD = "csrf_token"
COOKIE_PATH = "/console"


class SignInRequired(Exception):
    """No valid token in the cookie: the console answers with a redirect to its sign-in page."""


class CsrfError(TailoredGenError):
    code = "csrf_failed"
    http_status = 403


def session_id(request: Request) -> str:
    """This browser's session id: the cookie's, or a new one that `set_cookies` will send."""
    sid = getattr(request.state, "console_sid", None)
    if sid is None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        sid = cookie if len(cookie) == 32 and all(c in "0123456789abcdef" for c in cookie) else None
        if sid is None:
            request.state.new_console_sid = sid = secrets.token_hex(16)
        request.state.console_sid = sid
    return sid


def csrf_token(request: Request) -> str:
    return service_of(request).signer.digest(f"console-csrf\n{session_id(request)}")


async def checked_form(request: Request) -> FormData:
    """The posted form, after its CSRF token has been checked against this session's."""
    form = await request.form(max_files=1000, max_fields=1000)
    given = form.get(CSRF_FIELD)
    if request.cookies.get(SESSION_COOKIE) is None or not isinstance(given, str) or \
            not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), csrf_token(request).encode()):
        raise CsrfError("Forbidden: this form's CSRF token is missing or does not belong to your session. Reload the "
                        "page and send the form again.")
    return form


def console_caller(request: Request) -> Caller:
    """The signed-in caller, counted against the token's request rate like an API call."""
    caller = signed_in(request)
    service_of(request).limiter.check(caller.token_id)
    return caller


def signed_in(request: Request) -> Caller:
    """The signed-in caller without counting the request (images a page embeds)."""
    token = request.cookies.get(TOKEN_COOKIE)
    if not token:
        raise SignInRequired()
    try:
        who = service_of(request).auth.check(token)
    except UnauthorizedError:
        raise SignInRequired() from None  # a token the operator has since removed
    request.state.caller = who
    return Caller(who, service_of(request).auth.organization_of(who))


def _secure(request: Request) -> bool:
    public = service_of(request).settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


def set_cookies(request: Request, response: Response) -> Response:
    """Sends the session id when this request created it."""
    sid = getattr(request.state, "new_console_sid", None)
    if sid is not None:
        _set(request, response, SESSION_COOKIE, sid)
    return response


def sign_in(request: Request, response: Response, token: str) -> None:
    """Stores the (already checked) token and starts a new session: a session id an attacker planted
    before sign-in is worth nothing after it."""
    _set(request, response, SESSION_COOKIE, secrets.token_hex(16))
    _set(request, response, TOKEN_COOKIE, token)


def sign_out(request: Request, response: Response) -> None:
    _set(request, response, SESSION_COOKIE, secrets.token_hex(16))
    response.delete_cookie(TOKEN_COOKIE, path=COOKIE_PATH, secure=_secure(request), httponly=True, samesite="strict")


def _set(request: Request, response: Response, name: str, value: str) -> None:
    # no max_age: a session cookie, gone when the browser closes
    response.set_cookie(name, value, path=COOKIE_PATH, secure=_secure(request), httponly=True, samesite="strict")
