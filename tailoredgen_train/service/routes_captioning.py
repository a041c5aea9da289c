"""Bria's captioning endpoints, answered by the captioning worker (captioning.py through captions.py),
never in a handler:

    PUT  /tailored-gen/datasets/{dataset_id}/images    Regenerate All Captions (202, asynchronous)
    POST /tailored-gen/generate_visual_schema          5-10 images -> {visual_schema}
    POST /tailored-gen/refine_structured_prompt        a draft FIBO dataset's schema or caption, edited
    POST /tailored-gen/generate_prefix                 1-6 images -> {prefix} (legacy datasets)

Without a captioning model (serve --vlm) each answers 400 with how to enable one. Every dataset
lookup goes through the caller (access.py), as the other /tailored-gen endpoints.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from ..errors import CaptionFailedError, FieldError, InvalidParameterError
from .captions import regenerate_captions, request_caption_prefix, request_refine, request_visual_schema
from .deps import AsciiJSONResponse, caller_of, service_of
from .schemas import (ERROR_RESPONSES, MAX_ID, DatasetOut, MessageOut, PrefixOut, PrefixRequest, RefineOut,
                      RefineRequest, VisualSchemaOut, VisualSchemaRequest)

router = APIRouter(tags=["captions"], responses={
    **ERROR_RESPONSES,
    500: {"model": MessageOut, "description": "the captioning model produced no usable answer (its message says "
                                              "why), or an internal error"}})
DatasetId = Annotated[int, PathParam(ge=1, le=MAX_ID, examples=[1])]


@router.put("/datasets/{dataset_id}/images", status_code=202, response_model=DatasetOut,
            response_model_exclude_unset=True)
def regenerate_all_captions(dataset_id: DatasetId, request: Request) -> dict:
    """Queue a new automatic caption for every image of a draft dataset; poll GET
    /datasets/{dataset_id} until captions_update_status is completed."""
    return regenerate_captions(service_of(request), dataset_id, caller_of(request))


@router.post("/generate_visual_schema", response_model=VisualSchemaOut)
async def generate_visual_schema(body: VisualSchemaRequest, request: Request) -> Any:
    """The caption values most of 5 to 10 images share (FIBO's caption format), as a JSON string to
    set on a dataset (PUT /datasets/{dataset_id})."""
    future = await run_in_threadpool(request_visual_schema, service_of(request), body.images)
    return await _answer(request, future, lambda schema: {
        "visual_schema": json.dumps(schema, separators=(",", ":"), ensure_ascii=False)})


@router.post("/refine_structured_prompt", response_model=RefineOut)
async def refine_structured_prompt(body: RefineRequest, request: Request) -> Any:
    """A visual schema or a caption of a draft FIBO dataset, with `instruction` applied."""
    future = await run_in_threadpool(request_refine, service_of(request), body.dataset_id, body.structured_prompt,
                                     body.instruction, caller_of(request))
    return await _answer(request, future, lambda refined: {"structured_prompt": refined})


@router.post("/generate_prefix", response_model=PrefixOut)
async def generate_prefix(body: PrefixRequest, request: Request) -> Any:
    """A caption prefix for a legacy dataset from 1 to 6 of its images (the leading words their
    captions share up to "of", else the medium's: "An illustration of")."""
    if (body.image_urls is None) == (body.images is None):
        raise InvalidParameterError([FieldError(msg="send exactly one of image_urls and images", field_name="images",
                                                field_input="")])
    field, values = ("image_urls", body.image_urls) if body.image_urls is not None else ("images", body.images)
    if field == "image_urls":
        for index, value in enumerate(values):
            if not value.strip().lower().startswith(("http://", "https://")):
                raise InvalidParameterError([FieldError(msg="an http(s) URL", field_name=f"image_urls.{index}",
                                                        field_input=value[:200])])
    ip_name = body.ip_name if body.ip_type == "defined_character" else None
    future = await run_in_threadpool(request_caption_prefix, service_of(request), values, field, caller_of(request),
                                     ip_medium=body.ip_medium, ip_name=ip_name, dataset_id=body.dataset_id)
    return await _answer(request, future, lambda prefix: {"prefix": prefix})


async def _answer(request: Request, future: Future, body) -> Any:
    """Wait for the worker without holding a thread. A VLM that wrote nothing usable (after its
    retry) is a 500 whose message says so; other errors leave through the app's handlers."""
    try:
        return body(await asyncio.wrap_future(future))
    except CaptionFailedError as exc:
        return AsciiJSONResponse({"message": f"Captioning failed: {exc.message}", "code": exc.code,
                                  "request_id": getattr(request.state, "request_id", None)}, status_code=500)
