"""The Tailored Generation HTTP service: `tailoredgen-train serve`.

    settings.py   what the service is configured with
    db.py         the tables (SQLAlchemy: SQLite by default, any URL)
    auth.py       api_token, request rates, pre-signed download links
    launchers.py  where a job runs: a local process or Slurm
    runner.py     claim, launch, watch, settle and reconcile jobs
    generation.py the generation worker: a queue, warm pipelines, requests as rows
    captioning.py the captioning worker: a warm VLM; pending images as rows
    imports.py    files imported by reference (http(s) URLs, --import-root paths) and the zip checks
    bulk_upload.py  zip uploads into advanced datasets, in a background thread per upload
    core.py       Service: what every handler shares
    access.py     Caller: who is asking and what they may see (the one place scoping applies)
    deps.py       what the routes share (service lookup, auth dependency, errors, signed links);
                  routes import it, never app.py
    datasets.py, models.py, generation_requests.py, captions.py
                  the rules of projects, datasets, images, captions, models and generation
                  requests, which the API's handlers and the console both call
    app.py        the FastAPI app: errors, middleware, wiring
    routes_*.py   the endpoints (routes_generation.py: Bria's /v2 and /v1 generation paths;
                  routes_captioning.py: Regenerate All Captions, visual schemas, refine, prefixes)
    console/      the web console under /console (pages, templates, static files)
"""
