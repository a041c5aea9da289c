"""Service: what every request handler shares (settings, database, job runner, generation and
captioning workers, auth, limits). `create_app` builds one; handlers reach it through `deps.service_of`."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..config import EngineConfig, load_engine_config
from ..contract import canonical_version
from ..errors import ConfigError, InvalidParameterError, RateLimitedError, TailoredGenError, UnknownTrainingVersionError
from ..families import ModelFamily, check_config_family, family_class, load_version_map
from .auth import RateLimiter, TokenAuth, UrlSigner
from .captioning import CaptioningWorker, VlmPromptExpander
from .db import Database
from .generation import GenerationWorker, PromptExpander
from .launchers import Backend, LocalBackend, SlurmBackend, visible_gpus
from .runner import JobRunner
from .settings import ServiceSettings

log = logging.getLogger("tailoredgen_train.service")
T = TypeVar("T")


class StorageUnavailableError(TailoredGenError):
    """The data directory (or the SQLite file in it) is gone or was replaced while the server ran (503)."""

    code = "storage_unavailable"
    http_status = 503


class DecodeQueue:
    """Uploaded images are decoded by `workers` threads of their own, in turn: concurrent uploads queue
    instead of multiplying the memory a decode takes, and what the allocator keeps after a decode
    stays with those few threads. At most `queue` more uploads wait (each holds a request thread);
    beyond that an upload is answered 429."""

    def __init__(self, workers: int, queue: int = 16):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="tailoredgen-decode")
        self._admitted = threading.BoundedSemaphore(workers + queue)

    def run(self, function: Callable[..., T], *args: Any) -> T:
        if not self._admitted.acquire(blocking=False):
            raise RateLimitedError("Too many images are being checked at once: send this upload again in a few "
                                   "seconds.", retry_after_s=2)
        try:
            return self._pool.submit(function, *args).result()
        finally:
            self._admitted.release()

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Service:
    def __init__(self, settings: ServiceSettings, backend: Backend | None = None,
                 prompt_expander: PromptExpander | None = None):
        self.settings = settings
        _check_data_dir(settings.data_dir)
        self.version_map = load_version_map(settings.version_map)
        for family in settings.bases:
            family_class(family)  # an unknown family name fails at start-up, not at the first training
        self.engine_configs = {f: load_engine_config(p) for f, p in settings.engine_configs.items()}
        for family, config in self.engine_configs.items():
            check_config_family(config, family, source=f"--engine-config {family}={settings.engine_configs[family]}",
                                wanted_by=f"it is given for family {family}")
        self._families = {f: family_class(f)(self.engine_config(f).model) for f in settings.bases}
        for family in settings.bases:  # a global batch the processes cannot share fails here, not in every job
            try:
                self.engine_config(family).accumulation_steps(settings.num_processes)
            except ConfigError as exc:
                raise ConfigError(f"the engine config of family {family} with --num-processes "
                                  f"{settings.num_processes}: {exc.message}") from None
        self.db = Database(settings.database_url, migrate=settings.migrate)
        self._storage = _identities([settings.data_dir, *self.db.file()])
        """(path, (device, inode)) of the data directory and the SQLite file, as they were at start-up"""
        self.decoder = DecodeQueue(settings.max_concurrent_decodes)
        """decodes uploaded images, a few at a time (serve --max-concurrent-decodes)"""
        if backend is None and settings.launcher == "local":
            gpus = visible_gpus() if settings.gpus is None else settings.gpus
            backend = LocalBackend(settings.num_processes, gpus=gpus)
        elif backend is None:
            backend = SlurmBackend(settings.slurm_template, settings.num_processes, settings.slurm_nodes)
        self.runner = JobRunner(self.db, backend, settings)
        self.auth = TokenAuth(settings.tokens, settings.organizations)
        self.limiter = RateLimiter(self.db, settings.rate_limit_per_minute)
        self.signer = UrlSigner(settings.resolved_url_secret())
        self.captioning = CaptioningWorker(self.db, settings, self.dataset_dir)
        """The captioning model (serve --vlm) behind automatic captions and the captioning endpoints."""
        if prompt_expander is None and self.captioning.enabled:
            prompt_expander = VlmPromptExpander(self.captioning)
        self.prompt_expander = prompt_expander
        """Turns a plain-text prompt into a FIBO structured prompt (the captioning model by default);
        None: FIBO generation needs a structured_prompt."""
        self.generations = GenerationWorker(self.db, settings, self.family, self.runner.run_dir,
                                            lambda: self.prompt_expander)
        from .bulk_upload import BulkUploads  # here: bulk_upload.py imports this module

        self.bulk_uploads = BulkUploads(self)
        """the zip uploads (POST /datasets/{id}/images/bulk-upload) this server runs"""

    def family_of(self, training_version: str, field_name: str = "training_version") -> str:
        """The model family that trains this version here; a 400 naming the field when none does."""
        try:
            family = self.version_map[canonical_version(training_version)]
        except (KeyError, UnknownTrainingVersionError):
            family = None
        if family not in self.settings.bases:
            served = self.served_versions()
            raise InvalidParameterError.single(
                field_name, training_version,
                f"this deployment does not train {training_version!r}; it serves {', '.join(served) or 'nothing'} "
                "(the operator adds a family with `serve --base FAMILY=PATH`)")
        return family

    def served_versions(self) -> list[str]:
        """The training_versions this deployment trains (those whose family has a base)."""
        return sorted(v for v, f in self.version_map.items() if f in self.settings.bases)

    def family(self, name: str) -> ModelFamily:
        """A served family, with the engine config's model options (as its trainings use them)."""
        return self._families[name]

    def engine_config(self, family: str) -> EngineConfig:
        return self.engine_configs.get(family) or EngineConfig()

    def remove_upload_staging(self, older_than_s: float = 600.0) -> int:
        """Delete what a crash cut off, which no row refers to: staged uploads (`.upload-*` in a
        dataset folder and in runs/), and the folders of an unfinished clone or dataset removal
        (`datasets/.clone-*`, `datasets/.deleted-*`). Run at start-up; each lives for seconds, so one
        older than `older_than_s` is no other live server's."""
        cutoff = time.time() - older_than_s
        data = self.settings.data_dir
        removed = 0
        for path in [*data.glob("datasets/dataset-*/.upload-*"), *data.glob("runs/.upload-*"),
                     *data.glob("datasets/.clone-*"), *data.glob("datasets/.deleted-*")]:
            try:
                if path.lstat().st_mtime < cutoff:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # its upload finished meanwhile
        return removed

    def check_storage(self) -> None:
        """StorageUnavailableError (503) when the data directory or the SQLite file was removed or replaced
        since start-up: a write now would land in an unlinked file or a new, empty folder, and the client
        would get a 201 for data that is gone."""
        if _identities(path for path, _ in self._storage) != self._storage:
            log.error("the data directory %s (or its database) was removed or replaced while the server ran: writes "
                      "are refused with 503 until it is restored and the server restarted", self.settings.data_dir)
            raise StorageUnavailableError("Service unavailable: the server's storage is gone or was replaced, so "
                                          "nothing was written. Try again later; the operator must restore the data "
                                          "directory and restart the server.")

    def dataset_dir(self, dataset_id: int) -> Path:
        return self.settings.data_dir / "datasets" / f"dataset-{dataset_id}"


def _identities(paths) -> list[tuple[Path, tuple[int, int] | None]]:
    identities = []
    for path in paths:
        try:
            stat = path.stat()
            identities.append((path, (stat.st_dev, stat.st_ino)))
        except OSError:
            identities.append((path, None))
    return identities


def _check_data_dir(data_dir: Path) -> None:
    """Create --data-dir if needed and prove it writable, or stop with one line naming it and the fix."""
    probe = data_dir / f".write-check-{os.getpid()}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--data-dir {data_dir} cannot be used ({exc.strerror or exc}): pass a folder the service "
                          "can create and write (it holds the database, the datasets and the runs)") from None
