"""The HTTP service: `create_app(settings)` builds the FastAPI app; `serve()` runs it under uvicorn.

Every /tailored-gen endpoint needs the api_token header and counts against the token's request
rate. Errors leave as Bria documents them: 400 `{"errors": [...]}` for bad fields, `{"message": ...}`
otherwise, and a 500 that carries only a request id (the log line with that id has the details).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import EngineConfig, load_engine_config
from ..contract import canonical_version
from ..errors import InvalidParameterError, RateLimitedError, TailoredGenError, UnknownTrainingVersionError
from ..families import check_config_family, family_class, load_version_map
from .auth import RateLimiter, TokenAuth, UrlSigner
from .db import Database
from .launchers import Backend, LocalBackend, SlurmBackend
from .runner import JobRunner
from .schemas import field_errors
from .settings import ServiceSettings

log = logging.getLogger("tailoredgen_train.service")


class AsciiJSONResponse(JSONResponse):
    """Escapes non-ASCII, so that no text a client sent (a lone surrogate included) can break a response."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class Service:
    """What every request handler shares: settings, database, job runner, auth, limits."""

    def __init__(self, settings: ServiceSettings, backend: Backend | None = None):
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.version_map = load_version_map(settings.version_map)
        for family in settings.bases:
            family_class(family)  # an unknown family name fails at start-up, not at the first training
        self.engine_configs = {f: load_engine_config(p) for f, p in settings.engine_configs.items()}
        for family, config in self.engine_configs.items():
            check_config_family(config, family, source=f"--engine-config {family}={settings.engine_configs[family]}",
                                wanted_by=f"it is given for family {family}")
        self.db = Database(settings.database_url)
        if backend is None:
            backend = (LocalBackend(settings.num_processes) if settings.launcher == "local"
                       else SlurmBackend(settings.slurm_template, settings.num_processes))
        self.runner = JobRunner(self.db, backend, settings)
        self.auth = TokenAuth(settings.tokens)
        self.limiter = RateLimiter(settings.rate_limit_per_minute)
        self.signer = UrlSigner(settings.resolved_url_secret())

    def family_of(self, training_version: str, field_name: str = "training_version") -> str:
        """The model family that trains this version here; a 400 naming the field when none does."""
        try:
            family = self.version_map[canonical_version(training_version)]
        except (KeyError, UnknownTrainingVersionError):
            family = None
        if family not in self.settings.bases:
            served = sorted(v for v, f in self.version_map.items() if f in self.settings.bases)
            raise InvalidParameterError.single(
                field_name, training_version,
                f"this deployment does not train {training_version!r}; it serves {', '.join(served) or 'nothing'} "
                "(the operator adds a family with `serve --base FAMILY=PATH`)")
        return family

    def engine_config(self, family: str) -> EngineConfig:
        return self.engine_configs.get(family) or EngineConfig()

    def dataset_dir(self, dataset_id: int) -> Path:
        return self.settings.data_dir / "datasets" / f"dataset-{dataset_id}"


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


def error_response(request: Request, exc: TailoredGenError) -> JSONResponse:
    if isinstance(exc, InvalidParameterError):
        return AsciiJSONResponse({"errors": [vars(e) for e in exc.errors]}, status_code=400)
    if exc.http_status >= 500:
        request_id = getattr(request.state, "request_id", "-")
        log.error("request %s failed [%s]: %s", request_id, exc.code, exc.message)
        return AsciiJSONResponse({"message": "Internal server error", "request_id": request_id}, status_code=500)
    body = exc.to_dict()
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, RateLimitedError) else None
    return AsciiJSONResponse(body, status_code=exc.http_status, headers=headers)


def create_app(settings: ServiceSettings, backend: Backend | None = None) -> FastAPI:
    service = Service(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.runner.poll(startup=True)  # reconcile jobs an earlier server left before taking requests
        service.runner.start_watching()
        try:
            yield
        finally:
            service.runner.stop_watching()
            service.db.dispose()

    app = FastAPI(title="tailoredgen-train", version="0.1.0", lifespan=lifespan,
                  default_response_class=AsciiJSONResponse,
                  description="The Tailored Generation training lifecycle: projects, datasets, models, "
                              "start/stop training, checkpoints and download. Send your token in the "
                              "`api_token` header.")
    app.state.service = service
    _document_bria_errors_only(app)

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
        return AsciiJSONResponse({"errors": [vars(e) for e in field_errors(list(exc.errors()))]}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return AsciiJSONResponse({"message": str(exc.detail)}, status_code=exc.status_code,
                                 headers=getattr(exc, "headers", None))

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    from .routes_datasets import router as datasets_router
    from .routes_files import router as files_router
    from .routes_models import router as models_router

    authenticated = [Depends(caller)]
    app.include_router(datasets_router, prefix="/tailored-gen", dependencies=authenticated)
    app.include_router(models_router, prefix="/tailored-gen", dependencies=authenticated)
    app.include_router(files_router, prefix="/tailored-gen")  # pre-signed: the signature is the credential
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


def serve(settings: ServiceSettings, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, access_log=False)
