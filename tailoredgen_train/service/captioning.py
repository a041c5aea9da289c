"""Automatic captions in the service: the captioning worker (one warm FIBO-VLM `Captioner`, one
thread). What routes and the console call (queue a caption, ask for a visual schema) is in
captions.py.

The database is the queue. An image waiting for its caption is a row with caption_source
"pending"; the worker claims a batch of them from one dataset (one caption format, visual schema
and prefix), captions it and stores each outcome: "automatic" with the caption, or "failed" with
the reason and no caption (never a bad caption). Request handlers never caption: they mark rows
pending and wake the worker. A restart loses nothing: the rows stay pending, and at start-up the
images an earlier server on this host had claimed are released and captioned again.

`Image.caption_request` counts an image's caption changes. The worker stores a caption only while
the image is still pending with the request it captioned, so a caption set by hand (or requested
again) while the VLM works is never overwritten by the older request's caption.

Requests that wait for the VLM's answer (a visual schema, a caption prefix, a refined prompt, the
generation worker's plain-text prompts) are tasks with a Future, run before the next batch.
Why a thread in the API process: the reasons of generation.py (one warm model, no IPC, the GIL
released in kernels); the VLM and the FIBO pipeline then share the accelerator.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image as PILImage
from sqlalchemy import select, update

from .. import strict_json
from ..contract import is_fibo
from ..data.images import ImageProblem, load_rgb
from ..errors import CaptionInputError, InvalidParameterError, OutOfMemoryError, RateLimitedError, TailoredGenError
from .db import Database, Dataset, Image, utcnow
from .settings import ServiceSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
PENDING, AUTOMATIC, MANUAL, FAILED = "pending", "automatic", "manual", "failed"
BATCH_SIZE = 8  # images per generate call
MAX_WAITING_TASKS = 32  # answers waited for (visual schema, prefix, refine, prompts); beyond: 429
NO_VLM = ("Automatic captioning needs a captioning model, and this server has none. The operator enables it with "
          "`tailoredgen-train serve --vlm briaai/FIBO-vlm` (or --vlm DIR, a local Qwen3-VL). Until then, send "
          "captions with the images (caption field) or set them with PUT "
          "/tailored-gen/datasets/{id}/images/{image_id}.")


class CaptioningUnavailableError(TailoredGenError):
    """A captioning request to a server without a captioning model (400, with how to enable one)."""

    code = "captioning_unavailable"
    http_status = 400


class ServerStoppingError(TailoredGenError):
    code = "server_stopped"
    http_status = 500


@dataclass(frozen=True)
class _Claimed:
    image_id: int
    request: int
    path: Path


@dataclass(frozen=True)
class _Batch:
    dataset_id: int
    caption_format: str  # json (FIBO) or text (legacy)
    visual_schema: dict[str, Any] | None
    caption_prefix: str | None
    images: list[_Claimed]


class CaptioningWorker:
    def __init__(self, db: Database, settings: ServiceSettings, dataset_dir: Callable[[int], Path]):
        self.db = db
        self.settings = settings
        self.vlm = settings.vlm
        self.host = socket.gethostname()
        self._dataset_dir = dataset_dir
        self._tasks: deque[tuple[Callable[[Any], Any], Future]] = deque()
        self._lock = threading.Lock()
        self._work = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._captioner = None
        if self.vlm is not None:
            from ..captioning.loading import resolve_vlm

            resolve_vlm(self.vlm)  # a --vlm folder that does not exist fails at start-up, not at the first upload

    @property
    def enabled(self) -> bool:
        return self.vlm is not None

    def require(self) -> None:
        if not self.enabled:
            raise CaptioningUnavailableError(NO_VLM)

    # ---- lifecycle ---------------------------------------------------------------------------------

    def recover(self) -> int:
        """At start-up, before the worker runs. With a captioning model, the images an earlier server
        on this host had claimed are released (captioned again); without one, every pending image
        fails with the fix, so that none waits forever."""
        with self.db.transaction() as session:
            pending = update(Image).where(Image.caption_source == PENDING)
            if self.enabled:
                count = session.execute(pending.where(Image.caption_worker == self.host)
                                        .values(caption_worker=None)).rowcount
            else:
                count = session.execute(pending.values(caption_source=FAILED, caption_worker=None,
                                                       caption_error_code=CaptioningUnavailableError.code,
                                                       caption_error=NO_VLM, updated_at=utcnow())).rowcount
        if count:
            log.warning("%d pending caption(s) left by an earlier server %s", count,
                        "queued again" if self.enabled else "marked failed: no captioning model (--vlm)")
        return count

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="tailoredgen-captioning-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the batch in flight; the answers still waited for fail (their images stay pending)."""
        self._stopping.set()
        self._work.set()
        if self._thread is not None:
            self._thread.join(timeout=600)
        self._fail_waiting()

    def wake(self) -> None:
        """Images were marked pending: caption them now rather than at the next poll."""
        self._work.set()

    # ---- answers waited for ------------------------------------------------------------------------

    def submit(self, work: Callable[[Any], T]) -> Future[T]:
        """Run `work(captioner)` on the worker's thread, before the next batch of captions. A full
        queue is a 429: the client retries later."""
        self.require()
        future: Future[T] = Future()
        with self._lock:
            if self._stopping.is_set():
                raise ServerStoppingError("the server is stopping; send the request again")
            if len(self._tasks) >= MAX_WAITING_TASKS:
                raise RateLimitedError(f"Request limit exceeded: {len(self._tasks)} requests are waiting for this "
                                       "server's captioning model. Try again in a few seconds.", retry_after_s=5)
            self._tasks.append((work, future))
        self._work.set()
        return future

    def _run_task(self) -> bool:
        with self._lock:
            if not self._tasks:
                return False
            work, future = self._tasks.popleft()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(work(self._load()))
            except Exception as exc:
                future.set_exception(self._public_error(exc))
        return True

    def _fail_waiting(self) -> None:
        with self._lock:
            waiting, self._tasks = list(self._tasks), deque()
        for _, future in waiting:
            if future.set_running_or_notify_cancel():
                future.set_exception(ServerStoppingError("the server stopped before answering; send the request "
                                                         "again"))

    # ---- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        if not torch.cuda.is_available():
            torch.set_flush_denormal(True)  # as the generation worker: subnormals make CPUs crawl
        while not self._stopping.is_set():
            self._work.wait(self.settings.poll_interval_s)  # the poll finds work queued by another instance
            self._work.clear()
            while not self._stopping.is_set():
                try:
                    if self._run_task():
                        continue
                    batch = self._claim()
                    if batch is None:
                        break
                    self._caption(batch)
                except Exception:  # a database hiccup: keep the worker alive, the rows say what is left
                    log.exception("captioning worker: a pass failed")
                    break

    def _load(self):
        if self._captioner is None:
            from ..captioning.captioner import load_captioner

            started = time.monotonic()
            self._captioner = load_captioner(self.vlm, string_tokens=self.settings.vlm_string_tokens,
                                             max_pixels=self.settings.vlm_max_pixels, batch_size=BATCH_SIZE)
            log.info("captioning model %s loaded on %s in %.1f s", self.vlm, self._captioner.device,
                     time.monotonic() - started)
        return self._captioner

    def _claim(self) -> _Batch | None:
        """Up to BATCH_SIZE pending images of the dataset whose pending image is oldest, claimed for
        this host (a conditional UPDATE each, so two instances never claim the same request)."""
        unclaimed = (Image.caption_source == PENDING) & Image.caption_worker.is_(None)
        with self.db.transaction() as session:
            first = session.scalars(select(Image).where(unclaimed).order_by(Image.id).limit(1)).first()
            if first is None:
                return None
            dataset = session.get(Dataset, first.dataset_id)
            rows = session.scalars(select(Image).where(unclaimed, Image.dataset_id == dataset.id)
                                   .order_by(Image.id).limit(BATCH_SIZE)).all()
            folder = self._dataset_dir(dataset.id)
            claimed = []
            for row in rows:
                taken = session.execute(update(Image).where(Image.id == row.id, Image.caption_worker.is_(None),
                                                            Image.caption_request == row.caption_request)
                                        .values(caption_worker=self.host)).rowcount
                if taken:
                    claimed.append(_Claimed(row.id, row.caption_request, folder / row.file_name))
            fibo = is_fibo(dataset.training_version)
            return _Batch(dataset.id, "json" if fibo else "text",
                          json.loads(dataset.visual_schema) if fibo and dataset.visual_schema else None,
                          None if fibo else dataset.caption_prefix, claimed)

    def _caption(self, batch: _Batch) -> None:
        outcomes: dict[_Claimed, tuple[str | None, str | None, str | None]] = {}  # caption, error code, message
        pictures: list[tuple[_Claimed, PILImage.Image]] = []
        for item in batch.images:
            try:
                pictures.append((item, load_rgb(item.path)))
            except ImageProblem as e:  # deleted meanwhile, or unreadable
                outcomes[item] = (None, e.reason, e.detail)
        started = time.monotonic()
        try:
            if pictures:
                first = pictures[0][0]
                # the seed follows the request, so that a regenerated caption is a new draw
                results = self._load().caption_images(
                    [picture for _, picture in pictures], caption_format=batch.caption_format,
                    visual_schema=batch.visual_schema, caption_prefix=batch.caption_prefix,
                    seed=first.image_id + 1_000_003 * first.request)
                for (item, _), result in zip(pictures, results):
                    outcomes[item] = (result.caption, result.code, result.detail)
        except Exception as exc:
            error = self._public_error(exc)  # logs the details of what it does not pass on
            log.warning("captioning dataset %s failed: %s", batch.dataset_id, error)
            for item, _ in pictures:
                outcomes[item] = (None, error.code, error.message)
        self._store(outcomes)
        failed = sum(caption is None for caption, _, _ in outcomes.values())
        log.info("captioned %d image(s) of dataset %s in %.1f s (%d failed)", len(outcomes), batch.dataset_id,
                 time.monotonic() - started, failed)

    def _store(self, outcomes: dict[_Claimed, tuple[str | None, str | None, str | None]]) -> None:
        with self.db.transaction() as session:
            for item, (caption, code, message) in outcomes.items():
                session.execute(
                    update(Image).where(Image.id == item.image_id, Image.caption_request == item.request,
                                        Image.caption_source == PENDING, Image.caption_worker == self.host)
                    .values(caption=caption, caption_source=AUTOMATIC if caption is not None else FAILED,
                            caption_error_code=code if caption is None else None,
                            caption_error=message if caption is None else None, caption_worker=None,
                            updated_at=utcnow()))

    def _public_error(self, exc: Exception) -> Exception:
        """What a client may read about a failure: a TailoredGenError as it is, out of memory in
        words, anything else as an internal error whose details are in the log."""
        if isinstance(exc, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return OutOfMemoryError("the accelerator ran out of memory while captioning; try again later")
        if isinstance(exc, TailoredGenError) and exc.code != "vlm_invalid":  # vlm_invalid names server paths
            return exc
        log.error("captioning failed", exc_info=exc)
        return TailoredGenError("the captioning model failed; the server log has the details")


class VlmPromptExpander:
    """The generation worker's PromptExpander: the captioning worker's VLM writes the structured
    prompt (`<generate>`, keeping the model's visual schema), or refines one (`<refine>`)."""

    def __init__(self, worker: CaptioningWorker):
        self.worker = worker

    def expand(self, prompt: str, structured_prompt: str | None, seed: int,
               visual_schema: dict[str, Any] | None = None) -> str:
        if structured_prompt is not None:
            future = self.worker.submit(lambda captioner: captioner.refine(structured_prompt, prompt, seed=seed))
        else:
            future = self.worker.submit(lambda captioner: captioner.expand_prompt(prompt, visual_schema, seed=seed))
        return future.result()


# ---- the rules of the queue's rows (datasets.py and captions.py apply them) ----------------------


def captions_uploads(worker: CaptioningWorker, dataset: Dataset) -> bool:
    """Whether an image uploaded without a caption gets one automatically: with a captioning model,
    for a legacy dataset, or a FIBO dataset with a visual schema (as Bria: without one, FIBO uploads
    wait for Regenerate All Captions)."""
    return worker.enabled and (dataset.visual_schema is not None or not is_fibo(dataset.training_version))


def set_manual_caption(image: Image, caption: str) -> None:
    """A caption from the user; a pending automatic one for this image will not overwrite it."""
    image.caption, image.caption_source = caption, MANUAL
    _clear_request(image)


def queue_caption(image: Image) -> None:
    """Mark the image for a new automatic caption (the worker's queue is the pending rows)."""
    image.caption, image.caption_source = None, PENDING
    _clear_request(image)


def _clear_request(image: Image) -> None:
    image.caption_request = (image.caption_request or 0) + 1
    image.caption_worker = image.caption_error_code = image.caption_error = None
    image.updated_at = utcnow()


def normalize_visual_schema(text: str, field: str = "visual_schema") -> str:
    """A visual schema as stored: compact JSON of an object whose fields FIBO's captions have and
    whose values a caption can keep (400 naming the field otherwise)."""
    from ..captioning.grammar import CaptionLimits, caption_grammar

    try:
        value = strict_json.loads(text)
        if not isinstance(value, dict):
            raise ValueError("it is not a JSON object")
        caption_grammar(CaptionLimits(), value)  # the check captioning with it makes
    except (ValueError, CaptionInputError) as e:
        message = (e.message if isinstance(e, CaptionInputError)
                   else f"a visual schema is a JSON object as a string: {e}")
        raise InvalidParameterError.single(field, text[:200], message) from None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
