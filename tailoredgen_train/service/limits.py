"""Bounded work per request, decided before a handler runs: `RequestGuard`, a pure ASGI middleware
(it sees the body as it streams, which FastAPI's handlers never do: they read it whole first).

- A write (POST, PUT, PATCH, DELETE) answers 503 when the data directory is gone (Service.check_storage).
- Every API path (/tailored-gen, /v1, /v2, except the pre-signed files) has its api_token checked
  and the token's request rate applied before any of the body is read: a client without a valid
  token cannot make the server read, buffer or spool anything.
- Every body has a ceiling: an image upload (multipart) --max-upload-mb, the captioning endpoints
  that carry images in their JSON the same, any other body --max-json-kb. A Content-Length above it
  is answered 413 at once; a streamed body as soon as it passes it, and the form parser closes its
  spooled temporary files with it.

An early answer carries `Connection: close`, so the server stops receiving the rest of the body.
"""

from __future__ import annotations

from typing import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import TailoredGenError
from .core import Service
from .datasets import UploadTooLargeError, upload_too_large
from .deps import FILES_PREFIX, authenticate

API_PREFIXES = ("/tailored-gen/", "/v1/", "/v2/")
INLINE_IMAGE_ENDPOINTS = ("generate_visual_schema", "generate_prefix", "refine_structured_prompt")
"""captioning endpoints whose JSON body may carry images (base64): they take --max-upload-mb"""
FORM_FIELDS_BYTES = 2**20
"""what an upload's body may carry besides its file: the caption, the image name, the multipart framing"""
CONSOLE_FILES_PER_FORM = 10
"""the console's upload form sends several files at once: it may carry this many uploads' worth"""
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class BodyTooLargeError(TailoredGenError):
    code = "body_too_large"
    http_status = 413


class _BodyCutOff(Exception):
    """Raised to the app from `receive` once the body passes its ceiling; the guard answers 413."""


class RequestGuard:
    def __init__(self, app: ASGIApp, service: Service, error_response: Callable[[Request, TailoredGenError], Response]):
        self.app = app
        self.service = service
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        limit, too_large = self.body_limit(request)
        try:
            if request.method not in SAFE_METHODS:
                self.service.check_storage()
            if _needs_token(request.url.path):
                request.state.caller = authenticate(self.service, request.headers.get("api_token"))
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise too_large
        except TailoredGenError as exc:
            await self.refuse(request, exc, receive, send)
            return

        received = 0
        cut_off = started = False

        async def limited_receive() -> Message:
            nonlocal received, cut_off
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    cut_off = True
                    raise _BodyCutOff()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut_off and not started:
                return  # whatever the app made of a body cut off; the 413 goes out instead
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not cut_off:
                raise
        if cut_off and not started:
            await self.refuse(request, too_large, receive, send)

    def body_limit(self, request: Request) -> tuple[int, TailoredGenError]:
        """The most this request's body may hold, and the 413 it gets beyond that."""
        settings = self.service.settings
        path = request.url.path
        upload_mib = f"{settings.max_upload_bytes / 2**20:g} MiB"
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            if path.startswith("/console/"):
                limit = CONSOLE_FILES_PER_FORM * settings.max_upload_bytes
                return limit, UploadTooLargeError(
                    f"The form is larger than {limit / 2**20:g} MiB ({CONSOLE_FILES_PER_FORM} uploads of at most "
                    f"{upload_mib}): upload the images in several goes.")
            return settings.max_upload_bytes + FORM_FIELDS_BYTES, upload_too_large(settings.max_upload_bytes)
        endpoint = path.rsplit("/", 1)[-1]
        if path.startswith(("/tailored-gen/", "/v1/tailored-gen/")) and endpoint in INLINE_IMAGE_ENDPOINTS:
            return settings.max_upload_bytes, BodyTooLargeError(
                f"The request body is larger than this server's limit of {upload_mib} for the images of one request "
                "(serve --max-upload-mb): send fewer or smaller images, or http(s) URLs.")
        return settings.max_json_bytes, BodyTooLargeError(
            f"The request body is larger than this server's limit of {settings.max_json_bytes / 2**10:g} KiB "
            "(serve --max-json-kb).")

    async def refuse(self, request: Request, exc: TailoredGenError, receive: Receive, send: Send) -> None:
        response = self.error_response(request, exc)
        response.headers["Connection"] = "close"  # the rest of the body is not read
        await response(request.scope, receive, send)


def _needs_token(path: str) -> bool:
    return path.startswith(API_PREFIXES) and not path.startswith(f"{FILES_PREFIX}/")
