"""Service: what every request handler shares (settings, database, job runner, generation and
captioning workers, auth, limits). `create_app` builds one; handlers reach it through `deps.service_of`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..config import EngineConfig, load_engine_config
from ..contract import canonical_version
from ..errors import ConfigError, InvalidParameterError, UnknownTrainingVersionError
from ..families import ModelFamily, check_config_family, family_class, load_version_map
from .auth import RateLimiter, TokenAuth, UrlSigner
from .captioning import CaptioningWorker, VlmPromptExpander
from .db import Database
from .generation import GenerationWorker, PromptExpander
from .launchers import Backend, LocalBackend, SlurmBackend
from .runner import JobRunner
from .settings import ServiceSettings


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
        self.db = Database(settings.database_url, migrate=settings.migrate)
        if backend is None:
            backend = (LocalBackend(settings.num_processes) if settings.launcher == "local"
                       else SlurmBackend(settings.slurm_template, settings.num_processes))
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
        """Delete the staged uploads (`.upload-*` in a dataset folder) that a crash cut off: no row
        refers to them. Run at start-up; an upload stages its file for seconds, so one older than
        `older_than_s` is no other live server's."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in (self.settings.data_dir / "datasets").glob("dataset-*/.upload-*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # its upload finished meanwhile
        return removed

    def dataset_dir(self, dataset_id: int) -> Path:
        return self.settings.data_dir / "datasets" / f"dataset-{dataset_id}"


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
