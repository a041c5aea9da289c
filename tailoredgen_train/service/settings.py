"""ServiceSettings: everything `tailoredgen-train serve` is configured with, validated up front."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError

TOKENS_ENV = "TAILOREDGEN_API_TOKENS"
ORGANIZATION_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
URL_SECRET_ENV = "TAILOREDGEN_URL_SECRET"


@dataclass
class ServiceSettings:
    data_dir: Path
    """SQLite database (unless db_url is given), dataset folders and run folders live here."""
    tokens: list[str]
    bases: dict[str, str]
    """model family -> base model directory or hub id, e.g. {"fibo": "runs/tiny-fibo-base"}."""
    engine_configs: dict[str, str] = field(default_factory=dict)
    """model family -> engine config YAML; a family without one uses the engine defaults."""
    organizations: dict[str, str] = field(default_factory=dict)
    """token -> the organization it belongs to (--tokens-file lines `TOKEN ORGANIZATION`); a token
    without one is an organization of its own. Organizations never see each other's data."""
    db_url: str | None = None
    """an SQLAlchemy URL (postgresql://USER@HOST/DB for several replicas); SQLite in data_dir when None."""
    migrate: bool = True
    """migrate the database to this version's schema at start-up (serve --no-migrate: refuse to start
    unless `tailoredgen-train db upgrade` already did)."""
    version_map: str | None = None
    launcher: Literal["local", "slurm"] = "local"
    num_processes: int = 1
    """processes (GPUs) per job for the local launcher (>1 runs `accelerate launch --multi_gpu`); per
    node for the Slurm launcher."""
    gpus: list[str] | None = None
    """the node's GPU ids the local launcher hands out, num_processes to a job (its
    CUDA_VISIBLE_DEVICES); jobs wait while none is free. None: every visible GPU ([] on CPU: none)."""
    slurm_template: str | None = None
    """sbatch template; the packaged one (service/templates/train.sbatch) when None."""
    slurm_nodes: int = 1
    """nodes per job for the Slurm launcher, each running num_processes processes."""
    lost_jobs: Literal["resume", "fail"] = "resume"
    """A job whose process is gone without a result (server restart, node loss): relaunch it from
    its last checkpoint, or mark the model Failed."""
    max_resume_attempts: int = 3
    prune_finished_runs: bool = True
    """When a job ends (Completed, Failed, Stopped), delete its feature cache and all but its newest
    resume state; its published checkpoints are always kept."""
    rate_limit_per_minute: int = 600
    max_concurrent_trainings: int = 4
    """per token: InProgress + Stopping models it started (enforced in the database, across replicas)."""
    poll_interval_s: float = 2.0
    stop_grace_s: float = 300.0
    """after stop_training, SIGKILL a job that has not exited within this many seconds."""
    download_url_ttl_s: int = 3600
    url_secret: str | None = None
    public_url: str | None = None
    """the base of download URLs; the request's own base URL when None."""
    generation_resolution: dict[str, int] = field(default_factory=dict)
    """model family -> side of the square area the generation endpoints render (the family's native
    1024 when absent); tests and CPU-only demos set 64-128."""
    generation_queue_size: int = 64
    """generation requests waiting for the worker; beyond this a new request gets 429."""
    import_roots: list[Path] = field(default_factory=list)
    """folders on the server whose files bulk-upload (`zip_url`) and upload_model (`model_url`) may
    name by path; empty: only http(s) URLs are imported."""
    vlm: str | None = None
    """the captioning model (a hub id such as briaai/FIBO-vlm, or a Qwen3-VL folder): automatic
    captions, visual schemas, caption prefixes, refined prompts and plain-text FIBO prompts. None:
    those endpoints answer 400 with how to enable them."""
    vlm_string_tokens: int | None = None
    """one token allowance for every string value of a caption (shorter captions; tests, CPU demos)."""
    vlm_max_pixels: int | None = None
    """the largest image area given to the VLM (FIBO's 1024*28*28 when None)."""
    max_upload_bytes: int = 50 * 2**20
    """the largest image upload; a bigger body is refused with 413 from its Content-Length, or as
    soon as the streamed body passes it. The captioning endpoints that carry images in their JSON
    body take this much too."""
    max_json_bytes: int = 2**20
    """the largest JSON (or form) body of every other request (413 beyond)."""
    max_image_pixels: int = 50_000_000
    """an uploaded image with more pixels is refused (413) from its header, before it is decoded."""
    max_concurrent_decodes: int = 2
    """uploads decoded at once (a decode holds up to ~10 bytes per pixel); the others wait their turn."""

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.import_roots = [Path(root) for root in self.import_roots]
        for root in self.import_roots:
            if not root.is_absolute() or not root.is_dir():
                raise ConfigError(f"--import-root {root}: pass an absolute path to an existing folder")
        if not self.tokens:
            raise ConfigError(f"no API tokens configured: set {TOKENS_ENV}=token1,token2 or pass --tokens-file FILE")
        if any(len(t) < 8 for t in self.tokens):
            raise ConfigError("every API token must be at least 8 characters long")
        for token, organization in self.organizations.items():
            if token not in self.tokens:
                raise ConfigError("an organization is mapped for a token that is not configured")
            if not ORGANIZATION_NAME.fullmatch(organization):
                raise ConfigError(f"organization {organization[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        if not self.bases:
            raise ConfigError("no base model configured: pass --base FAMILY=PATH_OR_ID, "
                              "e.g. --base fibo=runs/tiny-fibo-base")
        if self.launcher not in ("local", "slurm"):
            raise ConfigError(f"launcher must be 'local' or 'slurm', not {self.launcher!r}")
        if self.lost_jobs not in ("resume", "fail"):
            raise ConfigError(f"lost_jobs must be 'resume' or 'fail', not {self.lost_jobs!r}")
        for name, value, low in (("num_processes", self.num_processes, 1), ("slurm_nodes", self.slurm_nodes, 1),
                                 ("max_resume_attempts", self.max_resume_attempts, 0),
                                 ("rate_limit_per_minute", self.rate_limit_per_minute, 1),
                                 ("max_concurrent_trainings", self.max_concurrent_trainings, 1),
                                 ("download_url_ttl_s", self.download_url_ttl_s, 1),
                                 ("generation_queue_size", self.generation_queue_size, 1),
                                 ("max_upload_bytes", self.max_upload_bytes, 1),
                                 ("max_json_bytes", self.max_json_bytes, 1),
                                 ("max_image_pixels", self.max_image_pixels, 1),
                                 ("max_concurrent_decodes", self.max_concurrent_decodes, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        for name, value in (("vlm_string_tokens", self.vlm_string_tokens), ("vlm_max_pixels", self.vlm_max_pixels)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
            if value is not None and self.vlm is None:
                raise ConfigError(f"{name} is given but no captioning model: add --vlm ID_OR_DIR")
        if self.poll_interval_s <= 0 or self.stop_grace_s <= 0:
            raise ConfigError("poll_interval_s and stop_grace_s must be positive")
        for flag, given in (("--engine-config", self.engine_configs), ("--generation-resolution",
                                                                        self.generation_resolution)):
            unknown = sorted(set(given) - set(self.bases))
            if unknown:
                raise ConfigError(f"{flag} given for {', '.join(unknown)} but no --base for it")
        from ..inference.generate import RESOLUTION_RANGE  # here: the CLI imports this module, torch stays lazy

        low, high = RESOLUTION_RANGE
        for family, side in self.generation_resolution.items():
            if isinstance(side, bool) or not isinstance(side, int) or not low <= side <= high:
                raise ConfigError(f"--generation-resolution {family}={side}: use an integer in {low}..{high} "
                                  "(1024 is the models' native size)")

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'tailoredgen.sqlite3'}"

    def resolved_url_secret(self) -> str:
        """The key that signs download URLs: given, from the environment, or created once in data_dir
        (several instances behind one database must share it through the environment)."""
        if self.url_secret:
            return self.url_secret
        if os.environ.get(URL_SECRET_ENV):
            return os.environ[URL_SECRET_ENV]
        path = self.data_dir / ".url_secret"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".url_secret.tmp-{os.getpid()}")
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
                handle.flush()
                os.fsync(handle.fileno())
            try:  # link, not rename: of replicas starting together on one data_dir the first one wins
                os.link(staging, path)
            except FileExistsError:
                pass
            finally:
                staging.unlink()
        return path.read_text().strip()


def load_tokens(tokens_file: str | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """Tokens from TAILOREDGEN_API_TOKENS (comma-separated) and/or a file (one per line, # comments;
    a line may name the token's organization after it: `TOKEN ORGANIZATION`)."""
    environ = os.environ if environ is None else environ
    tokens = [t.strip() for t in environ.get(TOKENS_ENV, "").split(",") if t.strip()]
    tokens += list(_token_lines(tokens_file))
    return list(dict.fromkeys(tokens))


def load_organizations(tokens_file: str | None) -> dict[str, str]:
    """token -> organization, from the --tokens-file lines that name one."""
    return {token: organization for token, organization in _token_lines(tokens_file).items() if organization}


def _token_lines(tokens_file: str | None) -> dict[str, str | None]:
    if not tokens_file:
        return {}
    try:
        lines = Path(tokens_file).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read --tokens-file {tokens_file}: {exc.strerror}") from None
    found: dict[str, str | None] = {}
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ConfigError(f"--tokens-file {tokens_file}, line {number}: expected `TOKEN` or `TOKEN ORGANIZATION`, "
                              f"found {len(words)} words")
        token, organization = words[0], (words[1] if len(words) == 2 else None)
        if token in found and found[token] != organization:
            raise ConfigError(f"--tokens-file {tokens_file}, line {number}: this token is listed twice with different "
                              "organizations")
        found[token] = organization
    return found


def parse_assignments(values: list[str], flag: str) -> dict[str, str]:
    """["fibo=runs/base"] -> {"fibo": "runs/base"}; names the flag when an item has no '='."""
    result: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{flag} {item!r} must look like FAMILY=VALUE, e.g. {flag} fibo=runs/tiny-fibo-base")
        result[name.strip()] = value.strip()
    return result


def parse_resolutions(values: list[str]) -> dict[str, int]:
    """["fibo=128"] -> {"fibo": 128}; names the flag when a value is not an integer."""
    result = {}
    for family, value in parse_assignments(values, "--generation-resolution").items():
        try:
            result[family] = int(value)
        except ValueError:
            raise ConfigError(f"--generation-resolution {family}={value}: the value must be an integer number of "
                              "pixels, e.g. --generation-resolution fibo=1024") from None
    return result
