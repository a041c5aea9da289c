"""The HTTP service: `create_app(settings)` builds the FastAPI app; `serve()` runs it under uvicorn.

Every endpoint (/tailored-gen, and the generation endpoints under /v2 and /v1) except the pre-signed
files needs the api_token header and counts against the token's request rate, both checked before
the body is read, which has a size limit (limits.py; the web console under
/console signs in with the same tokens, console/session.py). Errors leave as Bria
documents them: 400 `{"errors": [...]}` for bad fields, `{"message": ...}` otherwise, and a 500 that
carries only a request id (the log line with that id has the details).
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidParameterError, RateLimitedError, TailoredGenError
from .console import mount_console
from .core import Service, StorageUnavailableError
from .deps import AsciiJSONResponse, caller
from .generation import PromptExpander
from .launchers import Backend
from .limits import RequestGuard
from .schemas import field_errors, rule_errors_of
from .settings import ServiceSettings

log = logging.getLogger("tailoredgen_train.service")
DOCS_ASSETS = "/docs-assets"
"""Swagger UI's and ReDoc's files, served from the installed fastapi-offline package: the API's
documentation pages load nothing from a CDN, so they work on a cluster without internet access."""
HOME_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tailoredgen-train</title></head>
<body><h1>tailoredgen-train</h1>
<p>The Tailored Generation API: <a href="/docs">the API's documentation</a> (<a href="/openapi.json">OpenAPI</a>),
<a href="/console">the web console</a>, <a href="/healthz">health</a>.</p></body></html>
"""


def error_response(request: Request, exc: TailoredGenError) -> JSONResponse:
    if isinstance(exc, InvalidParameterError):
        return AsciiJSONResponse({"errors": [vars(e) for e in exc.errors]}, status_code=400)
    if exc.http_status >= 500 and not isinstance(exc, StorageUnavailableError):
        request_id = getattr(request.state, "request_id", "-")
        log.error("request %s failed [%s]: %s", request_id, exc.code, exc.message)
        return AsciiJSONResponse({"message": "Internal server error", "request_id": request_id}, status_code=500)
    body = exc.to_dict()
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimitedError) else None
    return AsciiJSONResponse(body, status_code=exc.http_status, headers=headers)


def create_app(settings: ServiceSettings, backend: Backend | None = None,
               prompt_expander: PromptExpander | None = None) -> FastAPI:
    """`prompt_expander`: what turns a plain-text FIBO prompt into a structured one; by default the
    captioning model (settings.vlm), and without either, FIBO generation requests must send
    `structured_prompt`."""
    service = Service(settings, backend, prompt_expander)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # reconcile what an earlier server left (jobs, unfinished generations) before taking requests
        service.runner.poll(startup=True)
        service.generations.fail_unfinished()
        service.captioning.recover()
        service.bulk_uploads.fail_unfinished()
        service.remove_upload_staging()
        service.runner.start_watching()
        service.generations.start()
        service.captioning.start()
        try:
            yield
        finally:
            service.generations.stop()  # first: its prompts may wait for the captioning worker
            service.captioning.stop()
            service.bulk_uploads.stop()
            service.runner.stop_watching()
            service.decoder.stop()
            service.db.dispose()

    app = FastAPI(title="tailoredgen-train", version="0.1.0", lifespan=lifespan,
                  default_response_class=AsciiJSONResponse, docs_url=None, redoc_url=None,
                  description="The Tailored Generation lifecycle: projects, datasets, automatic captions, "
                              "visual schemas and caption prefixes (with a captioning model: serve --vlm), models, "
                              "start/stop training, progress, logs, checkpoints with their sample images, the run "
                              "report, download, and generation with a trained model (FIBO: /v2, legacy: /v1). "
                              "Send your token in the `api_token` header.")
    app.state.service = service
    _document_bria_errors_only(app)
    # inside the request-id middleware below, so that its answers carry the id and are logged
    app.add_middleware(RequestGuard, service=service, error_response=error_response)

    @app.middleware("http")
    async def request_id_and_errors(request: Request, call_next):
        request.state.request_id = uuid.uuid4().hex[:16]
        started = time.monotonic()
        try:
            response = await call_next(request)
        except Exception:  # the body says nothing about internals; the log line has them
            log.exception("request %s %s %s failed", request.state.request_id, request.method, request.url.path)
            response = AsciiJSONResponse({"message": "Internal server error",
                                          "request_id": request.state.request_id}, status_code=500)
        response.headers["X-Request-ID"] = request.state.request_id
        log.info("%s %s %s -> %s in %.0f ms (token %s)", request.state.request_id, request.method, request.url.path,
                 response.status_code, 1000 * (time.monotonic() - started), getattr(request.state, "caller", "-"))
        return response

    @app.exception_handler(TailoredGenError)
    async def on_tailoredgen_error(request: Request, exc: TailoredGenError):
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        # every bad field in one answer: the body's cross-field rules too, for the fields pydantic passed
        errors = field_errors(list(exc.errors()))
        named = {e.field_name for e in errors}
        errors += [e for e in rule_errors_of(request.scope.get("route"), exc.body) if e.field_name not in named]
        return AsciiJSONResponse({"errors": [vars(e) for e in errors]}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return AsciiJSONResponse({"message": str(exc.detail)}, status_code=exc.status_code,
                                 headers=getattr(exc, "headers", None))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        service.check_storage()  # 503 when the data directory is gone: a load balancer takes this server out
        return {"status": "ok"}

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def home() -> str:
        return HOME_PAGE

    _serve_docs_offline(app)

    from .routes_captioning import router as captioning_router
    from .routes_datasets import router as datasets_router
    from .routes_files import router as files_router
    from .routes_generation import router as generation_router
    from .routes_models import router as models_router

    authenticated = [Depends(caller)]
    app.include_router(datasets_router, prefix="/tailored-gen", dependencies=authenticated)
    app.include_router(captioning_router, prefix="/tailored-gen", dependencies=authenticated)
    app.include_router(models_router, prefix="/tailored-gen", dependencies=authenticated)
    for router in (datasets_router, captioning_router, models_router):  # Bria's clients call /v1/tailored-gen/...
        app.include_router(router, prefix="/v1/tailored-gen", dependencies=authenticated, include_in_schema=False)
    app.include_router(generation_router, dependencies=authenticated)  # Bria's /v2 and /v1 paths
    app.include_router(files_router, prefix="/tailored-gen")  # pre-signed: the signature is the credential
    mount_console(app)  # /console: the web console (its own sign-in cookie; not in the OpenAPI description)
    return app


def _document_bria_errors_only(app: FastAPI) -> None:
    """Validation errors leave as 400 (Bria's shape), so FastAPI's 422 is not in the description."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    operation.get("responses", {}).pop("422", None)
            schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
            schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _serve_docs_offline(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts, styles and icon served by this server."""
    from importlib.resources import files

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from swagger.io

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)


def serve(settings: ServiceSettings, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
