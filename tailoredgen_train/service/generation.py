"""The generation worker: one thread with a queue, one warm `LoraPipeline` per base.

Request handlers never render. They store a request (a `GenerationRequest` row, so its status
survives a restart of the API process) and queue its id; the worker renders it, writes the PNGs
under `DATA_DIR/generations/<request_id>/` and records the outcome; a sync handler awaits that.

Why one thread rather than a process: the pipelines stay warm in the API process, which already
holds the database and the signer, with no second copy of the weights and no IPC; PyTorch releases
the GIL inside its kernels, so the event loop keeps answering while an image renders; and one
accelerator renders one image at a time anyway, so a second thread would only compete for it.
The price is isolation: a crash inside a native kernel (not a Python exception) takes the API
process down with it. Every Python failure, out-of-memory included, ends its request FAILED with a
message and the worker goes on with the next.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from sqlalchemy import select, update

from ..errors import (CaptionFailedError, CaptionInputError, InvalidParameterError, LoraFileError, PromptError,
                      RateLimitedError, TailoredGenError)
from ..families import ModelFamily
from ..inference import GeneratedImage, GenerationSettings, LoraPipeline
from .db import Database, Dataset, GenerationRequest, Model, utcnow
from .settings import ServiceSettings

log = logging.getLogger(__name__)
IN_PROGRESS, COMPLETED, FAILED = "IN_PROGRESS", "COMPLETED", "FAILED"  # Bria's status values


class PromptExpander(Protocol):
    """The seam for a captioning model (FIBO's VLM: captioning.VlmPromptExpander): plain text -> a
    FIBO structured prompt. Called on the generation worker's thread, never in a request handler."""

    def expand(self, prompt: str, structured_prompt: str | None, seed: int,
               visual_schema: dict[str, Any] | None = None) -> str:
        """A structured prompt (a JSON object, as a string) for `prompt`, keeping the values of
        `visual_schema` (the model's dataset's, as Bria translates prompts); with
        `structured_prompt`, that structured prompt refined by `prompt`."""


class GenerationWorker:
    def __init__(self, db: Database, settings: ServiceSettings, family: Callable[[str], ModelFamily],
                 run_dir: Callable[[int], Path], prompt_expander: Callable[[], PromptExpander | None]):
        self.db = db
        self.settings = settings
        self.host = socket.gethostname()
        self.out_dir = settings.data_dir / "generations"
        self._family = family
        self._run_dir = run_dir
        self._prompt_expander = prompt_expander
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._listeners: dict[str, list[Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._pipelines: dict[str, LoraPipeline] = {}
        self._pipelines_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def folder(self, request_id: str) -> Path:
        return self.out_dir / request_id

    def lora_dir(self, model_id: int, step: int) -> Path:
        return self._run_dir(model_id) / f"checkpoint-{step}"

    # ---- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tailoredgen-generation-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the request in flight; the ones still queued end FAILED (the client sends them again)."""
        if self._thread is not None:
            self._stopping.set()
            self._queue.put(None)
            self._thread.join(timeout=600)

    def fail_unfinished(self) -> int:
        """At start-up, before the worker runs: requests an earlier server on this host accepted but
        never finished cannot continue (its queue was in memory), so they end FAILED with the reason."""
        with self.db.transaction() as session:
            failed = session.execute(
                update(GenerationRequest)
                .where(GenerationRequest.status == IN_PROGRESS, GenerationRequest.host == self.host)
                .values(status=FAILED, error_code="server_restarted", finished_at=utcnow(),
                        error_message="the server restarted before this request finished; send the request again")
            ).rowcount
        if failed:
            log.warning("%d generation request(s) left unfinished by an earlier server marked FAILED", failed)
        return failed

    # ---- requests ----------------------------------------------------------------------------------

    def enqueue(self, request: GenerationRequest, on_done: Callable[[], None] | None = None) -> None:
        """Store `request` and queue it; `on_done` is called from the worker's thread when it has ended
        (COMPLETED or FAILED). A full queue is a 429: the client retries later."""
        if self._queue.qsize() >= self.settings.generation_queue_size:
            raise RateLimitedError(f"Request limit exceeded: {self._queue.qsize()} generation requests are waiting "
                                   "for this server's generation worker. Try again in a few seconds.", retry_after_s=5)
        request.host = self.host
        with self.db.transaction() as session:
            session.add(request)
        if on_done is not None:
            with self._lock:
                self._listeners.setdefault(request.id, []).append(on_done)  # before put: it cannot finish first
        self._queue.put(request.id)

    def load(self, request_id: str) -> GenerationRequest | None:
        with self.db.transaction() as session:
            return session.get(GenerationRequest, request_id)

    def _run(self) -> None:
        if not torch.cuda.is_available():
            # subnormal floats make x86 CPUs 10-100x slower (tiny and fp32 models hit them); flushing them to
            # zero changes no visible pixel. Per thread, and inherited by the threads this one starts.
            torch.set_flush_denormal(True)
        while (request_id := self._queue.get()) is not None:
            try:
                if self._stopping.is_set():
                    self._finish(request_id, status=FAILED, error_code="server_stopped",
                                 error_message="the server stopped before rendering this request; send it again")
                else:
                    self._process(request_id)
            except Exception:  # _process records its own failures; this only keeps the worker alive
                log.exception("generation %s: the worker failed to record its outcome", request_id)
            finally:
                self._notify(request_id)

    def _notify(self, request_id: str) -> None:
        with self._lock:
            listeners = self._listeners.pop(request_id, [])
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener whose event loop has closed (the server is stopping)
                log.debug("generation %s: a listener failed", request_id, exc_info=True)

    def _process(self, request_id: str) -> None:
        with self.db.transaction() as session:
            request = session.get(GenerationRequest, request_id)
            if request is None or request.status != IN_PROGRESS:
                return
            request.started_at = utcnow()
        started = time.monotonic()
        try:
            prompt = request.prompt if request.prompt is not None else self._expand(request)
            pipeline = self._pipeline(request.family)
            images = pipeline.generate(self.lora_dir(request.model_id, request.checkpoint_step), [prompt],
                                       GenerationSettings(**request.settings))
            files = self._write(request_id, images)
        except Exception as exc:
            code, message = self._failure(request, exc)
            self._finish(request_id, status=FAILED, error_code=code, error_message=message)
            return
        self._finish(request_id, status=COMPLETED, images=files, prompt=prompt)
        log.info("generation %s: model %s checkpoint %s, %d image(s) in %.1f s", request_id, request.model_id,
                 request.checkpoint_step, len(files), time.monotonic() - started)

    def _expand(self, request: GenerationRequest) -> str:
        expander = self._prompt_expander()
        if expander is None:  # the handler checked; the operator may have removed it since
            raise PromptError("this server has no captioning model to expand a plain-text prompt; send "
                              "structured_prompt instead")
        structured = expander.expand(request.plain_prompt or "", request.structured_prompt,
                                     request.settings["seed"], visual_schema=self._visual_schema(request.model_id))
        return self._family(request.family).prepare_prompt(structured)

    def _visual_schema(self, model_id: int) -> dict[str, Any] | None:
        """The visual schema of the dataset the model was trained on, if it has one."""
        with self.db.transaction() as session:
            text = session.scalar(select(Dataset.visual_schema).join(Model, Model.dataset_id == Dataset.id)
                                  .where(Model.id == model_id))
        return json.loads(text) if text else None

    def check_lora(self, family: str, lora_file: Path) -> None:
        """Load a LoRA file into the family's warm pipeline (the one generation uses) and unload it:
        a LoraFileError says why it does not fit (POST /models/upload_model)."""
        self._pipeline(family).check(lora_file)

    def _pipeline(self, family: str) -> LoraPipeline:
        with self._pipelines_lock:  # the worker and an upload_model handler may ask at once: build it once
            pipeline = self._pipelines.get(family)
            if pipeline is None:
                cuda = torch.cuda.is_available()
                pipeline = LoraPipeline(self._family(family), self.settings.bases[family],
                                        device="cuda" if cuda else "cpu",
                                        dtype=torch.bfloat16 if cuda else torch.float32)
                self._pipelines[family] = pipeline
        return pipeline

    def _write(self, request_id: str, images: list[GeneratedImage]) -> list[str]:
        """One PNG per image, each written to a staging name, fsynced and renamed into place."""
        folder = self.folder(request_id)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for index, item in enumerate(images):
            name = f"{index:02d}.png"
            staging = folder / f".{name}.partial"
            with open(staging, "wb") as handle:
                item.image.save(handle, format="PNG")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, folder / name)
            names.append(name)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return names

    def _failure(self, request: GenerationRequest, exc: Exception) -> tuple[str, str]:
        """(code, message) for the client: what went wrong in words that leak no server path; the log
        line with the request id has the details."""
        where = f"the server log has the details under request {request.id}"
        if isinstance(exc, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("generation %s: out of memory: %s", request.id, exc)
            return "oom", ("the accelerator ran out of memory while generating; try again later, or with fewer "
                           "steps_num or num_results")
        if isinstance(exc, (PromptError, InvalidParameterError, CaptionInputError, CaptionFailedError,
                            RateLimitedError)):  # the expander's prompt was unusable, or its queue full
            return exc.code, exc.message
        log.error("generation %s failed", request.id, exc_info=exc)
        if isinstance(exc, LoraFileError):
            return exc.code, (f"checkpoint {request.checkpoint_step} of model {request.model_id} cannot be loaded "
                              f"into the {request.family} base; {where}")
        code = exc.code if isinstance(exc, TailoredGenError) else "internal_error"
        return code, f"generation failed ({code}); {where}"

    def _finish(self, request_id: str, **values) -> None:
        with self.db.transaction() as session:
            session.execute(update(GenerationRequest).where(GenerationRequest.id == request_id)
                            .values(finished_at=utcnow(), **values))
