"""Automatic captions, as the API's handlers and the console ask for them: queue an image (or a
whole dataset) for the captioning worker (captioning.py), set a caption by hand so that a pending
automatic one never overwrites it, and the requests that wait for the VLM's answer (a visual
schema, a caption prefix, a refined structured prompt). Every lookup goes through a Caller."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select

from .. import strict_json
from ..contract import is_fibo
from ..data.images import ImageProblem, decode_rgb
from ..errors import FieldError, InvalidParameterError
from .access import Caller
from .captioning import queue_caption
from .core import Service
from .datasets import UnsupportedImageError, UploadTooLargeError, dataset_or_404, require_draft
from .db import Image, utcnow
from .deps import BadRequestError
from .schemas import MAX_IMAGE_BYTES
from .views import dataset_view

FETCH_TIMEOUT_S = 20.0  # a URL image: the whole download
MAX_DECODED_PIXELS = 40_000_000
VLM_IMAGE_SIDE = 2048  # decoded images are shrunk to this before they wait for the VLM (which takes ~1 MP)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def regenerate_captions(service: Service, dataset_id: int, caller: Caller) -> dict[str, Any]:
    """Bria's Regenerate All Captions: every image of a draft dataset is queued for a new automatic
    caption (manual ones included). Returns the dataset's view (captions_update_status in_progress
    when it has images)."""
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id, caller)
        service.captioning.require()
        require_draft(dataset, "regenerate captions")
        for image in session.scalars(select(Image).where(Image.dataset_id == dataset_id)):
            queue_caption(image)
        dataset.updated_at = utcnow()
        session.flush()
        view = dataset_view(session, dataset)
    service.captioning.wake()
    return view


def request_visual_schema(service: Service, images: Sequence[str], field: str = "images") -> Future[dict[str, Any]]:
    """A visual schema (the caption values most of 5 to 10 images share) from base64 or URL images."""
    service.captioning.require()
    pictures = read_images(images, field)
    return service.captioning.submit(lambda captioner: captioner.visual_schema(pictures))


def request_refine(service: Service, dataset_id: int, structured_prompt: str, instruction: str,
                   caller: Caller) -> Future[str]:
    """Bria's refine_structured_prompt: `structured_prompt` (a visual schema or a caption of a draft
    FIBO dataset) with `instruction` applied, as compact JSON."""
    service.captioning.require()
    with service.db.transaction() as session:
        dataset = dataset_or_404(session, dataset_id, caller)
        if not is_fibo(dataset.training_version):
            raise BadRequestError(f"dataset {dataset_id} is a legacy dataset with plain-text captions; "
                                  "refine_structured_prompt edits FIBO's structured JSON")
        if dataset.status != "draft":
            raise BadRequestError(f"dataset {dataset_id} is completed: refine_structured_prompt works for draft "
                                  "datasets only")
    try:
        compact = json.dumps(strict_json.loads(structured_prompt), separators=(",", ":"), ensure_ascii=False)
        if not compact.startswith("{"):
            raise ValueError("it is not a JSON object")
    except ValueError as e:
        raise InvalidParameterError.single("structured_prompt", structured_prompt[:200],
                                           f"a structured prompt is a JSON object as a string: {e}") from None
    if not instruction.strip():
        raise InvalidParameterError.single("instruction", instruction, "the instruction is empty")
    return service.captioning.submit(lambda captioner: captioner.refine(compact, instruction))


def request_caption_prefix(service: Service, images: Sequence[str], field: str, caller: Caller, *,
                           ip_medium: str | None = None, ip_name: str | None = None,
                           dataset_id: int | None = None) -> Future[str]:
    """Bria's generate_prefix: a legacy caption prefix from 1 to 6 images (the rule is in
    captioning/prefix.py). With `dataset_id`, the dataset must be a legacy draft."""
    service.captioning.require()
    if dataset_id is not None:
        with service.db.transaction() as session:
            dataset = dataset_or_404(session, dataset_id, caller)
            if is_fibo(dataset.training_version):
                raise InvalidParameterError.single(
                    "dataset_id", dataset_id, "a FIBO dataset has no caption prefix: its captions are structured JSON "
                    "kept consistent by a visual schema (POST /tailored-gen/generate_visual_schema)")
            require_draft(dataset, "change the caption_prefix")
    pictures = read_images(images, field)

    def prefix(captioner) -> str:
        from ..captioning.prefix import common_caption_prefix

        results = captioner.caption_images(pictures, caption_format="text")
        captions = [r.caption for r in results if r.ok and r.caption.strip()]
        return common_caption_prefix(captions or [""], ip_medium=ip_medium, ip_name=ip_name)

    return service.captioning.submit(prefix)


# ---- images sent by value or by URL ----------------------------------------------------------------


def read_images(values: Sequence[str], field: str) -> list[PILImage.Image]:
    """Decode base64 images (a data: URI too) and fetch http(s) ones, each at most MAX_IMAGE_BYTES:
    400 naming `field.N` for a bad value or URL, 413 for a larger image, 415 for one that is not a
    jpg, png or webp image."""
    pictures = []
    for index, value in enumerate(values):
        name = f"{field}.{index}"
        value = value.strip()
        scheme = _SCHEME.match(value)
        if scheme and scheme.group(1).lower() in ("http", "https"):
            data = _fetch(value, name)
        elif scheme and scheme.group(1).lower() != "data":
            raise _bad(name, value, f"only http and https URLs are fetched, not {scheme.group(1)}:")
        else:
            data = _base64(value, name)
        try:
            picture = decode_rgb(data, max_pixels=MAX_DECODED_PIXELS)
        except ImageProblem as e:
            raise UnsupportedImageError(f"Unsupported image in {name} ({e.reason}): {e.detail}. Send a jpg, png or "
                                        "webp image.") from None
        picture.thumbnail((VLM_IMAGE_SIDE, VLM_IMAGE_SIDE))
        pictures.append(picture)
    return pictures


def _base64(value: str, name: str) -> bytes:
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise _bad(name, header, "a data: URI must be base64 (data:image/png;base64,...)")
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _bad(name, value, "not a base64-encoded image or an http(s) URL") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise UploadTooLargeError(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    return data


def _fetch(url: str, name: str) -> bytes:
    """GET `url` (redirects followed, http(s) only), at most MAX_IMAGE_BYTES in FETCH_TIMEOUT_S."""
    import httpx

    deadline = time.monotonic() + FETCH_TIMEOUT_S
    data = bytearray()
    try:
        with httpx.Client(timeout=FETCH_TIMEOUT_S, follow_redirects=True, max_redirects=3) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise _bad(name, url, f"fetching it answered HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise UploadTooLargeError(f"{name} is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
                if time.monotonic() > deadline:
                    raise _bad(name, url, f"the download took more than {FETCH_TIMEOUT_S:.0f} s")
    except httpx.HTTPError as e:
        raise _bad(name, url, f"cannot fetch it: {type(e).__name__}") from None
    return bytes(data)


def _bad(name: str, value: str, message: str) -> InvalidParameterError:
    return InvalidParameterError([FieldError(msg=message, field_name=name, field_input=value[:200])])
