"""The web console: server-rendered pages under /console for the people who prepare datasets and
judge models, built on the service functions the API calls (datasets.py, models.py,
generation_requests.py), so no rule exists twice.

    session.py     sign-in with an API token (an HttpOnly, SameSite=Strict cookie), CSRF tokens
    web.py         templates (Jinja2, autoescaped), security headers, errors as pages
    signin.py      sign in and out
    projects.py    projects, datasets, images: upload, captions, complete (the preflight's findings)
    thumbnails.py  dataset thumbnails, made once and cached under the data dir
    runs.py        models: create, start, stop; the run page and what its script polls
    generate.py    generate with a checkpoint, and the result
    templates/, static/   the pages, one stylesheet and one script (no CDN: it works offline)
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles

from . import generate, projects, runs, signin
from .web import PREFIX, STATIC


def mount_console(app: FastAPI) -> None:
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    for module in (signin, projects, runs, generate):
        router.include_router(module.router)
    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=STATIC), name="console-static")
