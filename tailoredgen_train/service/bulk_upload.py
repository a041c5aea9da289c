"""Bulk upload: one zip of up to 5000 images into an empty advanced draft dataset (Bria allows one
per dataset). POST answers 202 at once; a background thread fetches the zip (an http(s) URL, or a
path under `serve --import-root`), checks it as a whole (imports.check_zip: nothing of a malicious
zip is read), then stores each image through datasets.store_image, exactly as a single upload.
GET .../bulk-upload/status reports progress and every image refused, with its error code.

Captions come from the zip (`IMAGE.txt` next to an image, or a metadata.jsonl / metadata.csv in its
folder, the engine's own dataset format) unless `automatic_captioning` asks the captioning model
for all of them. The row survives restarts: an upload that a stopped server left unfinished ends
`failed` with the reason, and the images it stored stay.
"""

from __future__ import annotations

import io
import logging
import socket
import tempfile
import threading
import uuid
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from ..data.metadata import read_metadata
from ..errors import FieldError, InvalidParameterError, NotFoundError, TailoredGenError
from .access import Caller
from .core import Service
from .datasets import MAX_BULK_IMAGES, dataset_or_404, require_draft, store_image
from .db import BulkUpload, Image, utcnow
from .deps import BadRequestError, ConflictError
from .imports import Source, ZipRefusedError, check_zip, fetch, read_member, resolve_source
from .schemas import BulkUploadRequest

log = logging.getLogger(__name__)
PENDING, PROCESSING, COMPLETED, FAILED = "pending", "processing", "completed", "failed"  # Bria's values
UNFINISHED = (PENDING, PROCESSING)
MAX_ZIP_BYTES = 5 * 2**30  # Bria's limit
MAX_EXPANDED_BYTES = MAX_BULK_IMAGES * 8 * 2**20  # 40 GB: 5000 images of 8 MB on average
MAX_CAPTION_BYTES = 2**20
MAX_MEMBER_BYTES = 64 * 2**20  # a zip member larger than this is refused with the whole zip
PROGRESS_EVERY = 10  # images between progress writes


class BulkUploads:
    """The zip uploads this server runs, one thread each."""

    def __init__(self, service: Service):
        self.service = service
        self.host = socket.gethostname()
        self._threads: dict[int, threading.Thread] = {}
        self._stopping = threading.Event()

    def fail_unfinished(self) -> int:
        """At start-up: uploads an earlier server on this host left unfinished end failed."""
        with self.service.db.transaction() as session:
            return session.execute(
                update(BulkUpload).where(BulkUpload.status.in_(UNFINISHED), BulkUpload.host == self.host)
                .values(status=FAILED, error_code="server_restarted", updated_at=utcnow(),
                        error_message="the server restarted during the upload; the images stored before stay in "
                                      "the dataset (clone it, or create a new dataset, to upload the zip again)")
            ).rowcount

    def stop(self) -> None:
        self._stopping.set()
        for thread in list(self._threads.values()):
            thread.join(timeout=60)

    def start(self, dataset_id: int, body: BulkUploadRequest, caller: Caller) -> dict[str, Any]:
        """POST /datasets/{id}/images/bulk-upload: checks, the row, the thread; the status (202)."""
        service = self.service
        with service.db.transaction() as session:
            self._check_dataset(session, dataset_id, caller)
        if body.automatic_captioning:
            service.captioning.require()
        source = resolve_source(body.zip_url, "zip_url", service.settings.import_roots, MAX_ZIP_BYTES)
        if source.path is not None:  # a file on this server: refuse a bad zip now, in the answer
            with _open_zip(source.path) as archive:
                _check(archive)
        try:
            with service.db.transaction() as session:
                self._check_dataset(session, dataset_id, caller)  # again: a concurrent request may have won
                row = BulkUpload(dataset_id=dataset_id, status=PENDING, host=self.host, failed_images=[])
                session.add(row)
                session.flush()
                view = status_view(row)
        except IntegrityError:
            raise ConflictError(f"Dataset {dataset_id} already has a bulk upload.") from None
        thread = threading.Thread(target=self._run, args=(dataset_id, source, caller, bool(body.automatic_captioning)),
                                  name=f"tailoredgen-bulk-upload-{dataset_id}", daemon=True)
        self._threads[dataset_id] = thread
        thread.start()
        return view

    def status(self, dataset_id: int, caller: Caller) -> dict[str, Any]:
        with self.service.db.read() as session:
            dataset_or_404(session, dataset_id, caller)
            row = session.get(BulkUpload, dataset_id)
            if row is None:
                raise NotFoundError(f"Bulk upload not found: dataset {dataset_id} has none; start one with POST "
                                    f"/tailored-gen/datasets/{dataset_id}/images/bulk-upload")
            return status_view(row)

    @staticmethod
    def _check_dataset(session, dataset_id: int, caller: Caller) -> None:
        dataset = dataset_or_404(session, dataset_id, caller)
        if dataset.upload_type != "advanced":
            raise BadRequestError(f"Dataset {dataset_id} is a basic dataset: a zip is uploaded into a dataset created "
                                  "with upload_type advanced (basic datasets take images one by one).")
        require_draft(dataset, "upload images")
        if session.get(BulkUpload, dataset_id) is not None:
            raise ConflictError(f"Dataset {dataset_id} already has a bulk upload (one per dataset): create a new "
                                "advanced dataset for another zip.")
        if session.scalar(select(func.count()).select_from(Image).where(Image.dataset_id == dataset_id)):
            raise ConflictError(f"Dataset {dataset_id} already has images: a zip is uploaded into an empty dataset.")

    # ---- the thread ------------------------------------------------------------------------------

    def _run(self, dataset_id: int, source: Source, caller: Caller, automatic: bool) -> None:
        staging = self.service.dataset_dir(dataset_id) / f".upload-bulk-{uuid.uuid4().hex}"
        outcome: dict[str, Any] = {"status": COMPLETED}
        try:
            self._update(dataset_id, status=PROCESSING)
            path = fetch(source, staging, MAX_ZIP_BYTES)
            with _open_zip(path) as archive:
                plan = _check(archive)
                self._update(dataset_id, total=len(plan.images))
                self._store_all(dataset_id, archive, plan, caller, automatic)
        except TailoredGenError as exc:
            outcome = {"status": FAILED, "error_code": exc.code, "error_message": exc.message}
        except Exception:
            log.exception("bulk upload into dataset %s failed", dataset_id)
            outcome = {"status": FAILED, "error_code": "internal_error",
                       "error_message": "the upload failed on the server; the server log has the details"}
        finally:
            staging.unlink(missing_ok=True)  # before the status says it ended: nothing of it stays behind
            self._update(dataset_id, **outcome)
            self._threads.pop(dataset_id, None)

    def _store_all(self, dataset_id: int, archive: zipfile.ZipFile, plan, caller: Caller, automatic: bool) -> None:
        captions = {} if automatic else _metadata_captions(archive, plan)
        done, failures = 0, []
        for index, info in enumerate(plan.images, 1):
            if self._stopping.is_set():
                raise ServerStoppedError("the server stopped during the upload; the images stored before stay in "
                                         "the dataset")
            try:
                caption = None if automatic else _caption_for(archive, plan, captions, info.filename)
                data = read_member(archive, info, self.service.settings.max_upload_bytes)
                store_image(self.service, dataset_id, io.BytesIO(data), info.filename, caption, caller,
                            automatic=True if automatic else None)
                done += 1
            except TailoredGenError as exc:
                failures.append({"filename": info.filename, "error_code": exc.code, "error_message": exc.message})
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                failures.append({"filename": info.filename, "error_code": "corrupt_zip_member",
                                 "error_message": f"the zip member cannot be read: {exc}"})
            if index % PROGRESS_EVERY == 0 or index == len(plan.images):
                self._update(dataset_id, done=done, failed=len(failures), failed_images=list(failures))

    def _update(self, dataset_id: int, **values: Any) -> None:
        with self.service.db.transaction() as session:
            session.execute(update(BulkUpload).where(BulkUpload.dataset_id == dataset_id)
                            .values(updated_at=utcnow(), **values))


class ServerStoppedError(TailoredGenError):
    code = "server_stopped"
    http_status = 503


def status_view(row: BulkUpload) -> dict[str, Any]:
    processed = row.done + row.failed
    return {"dataset_id": row.dataset_id, "status": row.status,
            "progress_percentage": 100 if row.status == COMPLETED else
            (100 * processed // row.total if row.total else 0),
            "total_processed": processed, "total_images": row.total, "done": row.done, "failed": row.failed,
            "failed_images": list(row.failed_images or []),
            "error": {"code": row.error_code, "message": row.error_message} if row.status == FAILED else None,
            "created_at": row.created_at, "updated_at": row.updated_at}


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ZipRefusedError(f"zip_url does not name a readable zip file ({exc})") from None


def _check(archive: zipfile.ZipFile):
    return check_zip(archive, max_images=MAX_BULK_IMAGES, max_member_bytes=MAX_MEMBER_BYTES,
                     max_total_bytes=MAX_EXPANDED_BYTES)


def _metadata_captions(archive: zipfile.ZipFile, plan) -> dict[str, str]:
    """image member name -> caption, from each folder's metadata file, read by the engine's own
    parser (a malformed file fails the upload with every broken line named)."""
    captions = {}
    for folder, info in plan.metadata.items():
        with tempfile.TemporaryDirectory(prefix="tailoredgen-bulk-") as tmp:
            (Path(tmp) / PurePosixPath(info.filename).name).write_bytes(read_member(archive, info, MAX_MEMBER_BYTES))
            rows = read_metadata(Path(tmp))
        for row in rows:
            if row.caption is not None:
                captions[str(PurePosixPath(folder) / row.file_name) if folder else row.file_name] = row.caption
    return captions


def _caption_for(archive: zipfile.ZipFile, plan, captions: dict[str, str], name: str) -> str | None:
    """The metadata file's caption of an image, else its IMAGE.txt's, else None."""
    if name in captions:
        return captions[name]
    info = plan.text_captions.get(str(PurePosixPath(name).with_suffix("")))
    if info is None:
        return None
    data = read_member(archive, info, MAX_CAPTION_BYTES)
    try:
        if len(data) > MAX_CAPTION_BYTES:
            raise ValueError(f"it is larger than {MAX_CAPTION_BYTES} bytes")
        return data.decode("utf-8-sig")
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidParameterError([FieldError(f"{info.filename} is not a usable caption: {exc}", "caption",
                                                info.filename)]) from None
