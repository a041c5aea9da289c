"""The service's tables (SQLAlchemy) and the one way to open a transaction.

SQLite is the embedded default; PostgreSQL (`postgresql+psycopg://...`) is the production database
that several replicas share. The schema is migrated by Alembic (service/migrations) when a Database
opens. On SQLite every transaction starts with BEGIN IMMEDIATE, so that a read followed by a write
never fails with "database is locked" halfway through: writers queue on the busy timeout instead,
and a transaction is atomic with respect to every other writer. A `read()` begins DEFERRED: it
takes no write lock, so it neither waits for a writer nor holds one up (in WAL mode it reads the
last committed state). On PostgreSQL (READ COMMITTED) whatever must be exact under concurrency is
one conditional statement or takes a row lock first.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (JSON, BigInteger, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine,
                        event, inspect)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from ..errors import ConfigError

_READ_ONLY = "tailoredgen_read_only"  # execution option of read(): SQLite begins DEFERRED
# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> str:
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat()


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    project_name: Mapped[str] = mapped_column(Text)
    project_description: Mapped[str | None] = mapped_column(Text, nullable=True)
    ip_name: Mapped[str | None] = mapped_column(Text, nullable=True)
    ip_description: Mapped[str | None] = mapped_column(Text, nullable=True)
    ip_medium: Mapped[str] = mapped_column(String(32))
    ip_type: Mapped[str] = mapped_column(String(32))
    org: Mapped[str] = mapped_column(String(80), index=True)
    """the organization that owns it (access.Caller.organization); no other organization sees it"""
    training_version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    updated_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    org: Mapped[str] = mapped_column(String(80), index=True)
    """the organization that owns it (access.Caller.organization); no other organization sees it"""
    name: Mapped[str] = mapped_column(Text)
    training_version: Mapped[str] = mapped_column(String(16))
    caption_prefix: Mapped[str | None] = mapped_column(Text, nullable=True)
    visual_schema: Mapped[str | None] = mapped_column(Text, nullable=True)
    """FIBO: the caption values every automatic caption keeps, a JSON object as compact text"""
    status: Mapped[str] = mapped_column(String(16), default="draft")
    upload_type: Mapped[str] = mapped_column(String(16), default="basic")
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    updated_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class Image(Base):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), index=True)
    image_name: Mapped[str] = mapped_column(Text)
    file_name: Mapped[str] = mapped_column(String(64))
    """the stored file, relative to the dataset folder (the name is the server's, never the client's)"""
    caption: Mapped[str | None] = mapped_column(Text, nullable=True)
    caption_source: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    """manual, automatic, pending (queued for the captioning worker), failed; None: no caption and none coming"""
    caption_request: Mapped[int] = mapped_column(Integer, default=0)
    """counts the caption's changes: the worker stores a caption only for the request it captioned"""
    caption_worker: Mapped[str | None] = mapped_column(Text, nullable=True)
    """the host whose captioning worker claimed this pending image"""
    caption_error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    caption_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    updated_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class BulkUpload(Base):
    """A dataset's zip upload (Bria allows one per dataset): its progress and every image it refused."""

    __tablename__ = "bulk_uploads"
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending, processing, completed, failed (Bria's values)"""
    host: Mapped[str] = mapped_column(Text)
    """the machine whose server runs it: a restarted server fails only its own host's uploads"""
    total: Mapped[int] = mapped_column(Integer, default=0)
    """images in the zip (0 until it is read)"""
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    failed_images: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    """[{"filename", "error_code", "error_message"}] of the images refused"""
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    """why the upload as a whole failed (the zip could not be fetched or was refused)"""
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    updated_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    """None for a model uploaded as a LoRA file (POST /models/upload_model)"""
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    org: Mapped[str] = mapped_column(String(80), index=True)
    """the organization that owns it (access.Caller.organization); no other organization sees it"""
    training_version: Mapped[str] = mapped_column(String(16))
    training_mode: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="Created", index=True)
    custom_metadata: Mapped[str] = mapped_column(Text, default="")
    active_model_version: Mapped[str] = mapped_column(String(16), default="default")
    training_parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    generation_prefix: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """a hash of the token that started the training (never the token): the per-token training cap"""
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    stop_requested_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    updated_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class TrainingJob(Base):
    """One attempt at running a model's training; a resumed job is a new attempt in the same run folder."""

    __tablename__ = "training_jobs"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    run_dir: Mapped[str] = mapped_column(Text)
    launcher: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(Text)
    external_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """the local process id or the Slurm job id"""
    process_started: Mapped[float | None] = mapped_column(Float, nullable=True)
    """the local process's start time: a pid reused by another process does not match"""
    launch_token: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """committed before the process is started, which carries it in its environment: a server that
    died before it recorded external_id finds the process by it. None: the job waits in the queue"""
    devices: Mapped[str | None] = mapped_column(String(256), nullable=True)
    """the GPUs the job was given (its CUDA_VISIBLE_DEVICES, comma-separated); None: not handed out"""
    started_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    ended_at: Mapped[str | None] = mapped_column(String(32), nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("model_id", "step"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    training_job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)


class GenerationRequest(Base):
    """One call to a generation endpoint: queued, rendered by the generation worker, answered. A row
    outlives the API process, so a client can poll its status after a restart."""

    __tablename__ = "generation_requests"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    """the request_id clients poll (GET /v2/status/{request_id})"""
    api: Mapped[str] = mapped_column(String(8))
    """"v2" (FIBO) or "v1" (legacy): the shape of the answer"""
    owner: Mapped[str] = mapped_column(String(32), index=True)
    """a hash of the caller's token (the request log's name for who asked)"""
    org: Mapped[str] = mapped_column(String(80), index=True)
    """the organization that owns it (access.Caller.organization); no other organization sees it"""
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    checkpoint_step: Mapped[int] = mapped_column(Integer)
    family: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    """the prompt as the pipeline receives it; None until the prompt expander has written it"""
    plain_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    """a FIBO request's plain-text prompt, for the prompt expander"""
    structured_prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    """a FIBO request's structured prompt as sent, refined by plain_prompt when both are given"""
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    """GenerationSettings fields"""
    status: Mapped[str] = mapped_column(String(16), default="IN_PROGRESS", index=True)
    images: Mapped[list[str]] = mapped_column(JSON, default=list)
    """PNG file names in the request's folder, in order"""
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    host: Mapped[str] = mapped_column(Text)
    """the machine whose worker renders it: a restarted server fails only its own host's requests"""
    created_at: Mapped[str] = mapped_column(String(32), default=utcnow)
    started_at: Mapped[str | None] = mapped_column(String(32), nullable=True)
    finished_at: Mapped[str | None] = mapped_column(String(32), nullable=True)


class TokenLimit(Base):
    """Per token: when its next request is due at the request rate (auth.RateLimiter), and the row
    that a training claim locks, so that two claims of one token never both pass the training cap."""

    __tablename__ = "token_limits"
    token: Mapped[str] = mapped_column(String(32), primary_key=True)
    """auth.token_id of the token (never the token)"""
    due: Mapped[float] = mapped_column(Float, default=0.0)
    """Unix time at which the token's requests so far, one every 60/rate seconds, are all paid for"""


class Database:
    def __init__(self, url: str, *, migrate: bool = True):
        """`migrate`: bring the schema to the newest revision (else refuse a database that is not there)."""
        self.url = url = normalize_url(url)
        self.is_sqlite = url.startswith("sqlite")
        connect_args = {"check_same_thread": False, "timeout": 60} if self.is_sqlite else {}
        self.engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not self.is_sqlite)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", lambda conn: conn.exec_driver_sql(
                "BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE"))
        from . import migrations  # it imports this module (the models) for Alembic's env.py

        try:
            self.revisions = migrations.upgrade(self.engine) if migrate else migrations.check_current(self.engine)
            """(the schema's revision when opened, the revision now)"""
            self._check_columns()
        except OperationalError as exc:  # unreachable server, wrong password, unknown database
            self.engine.dispose()
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise ConfigError(f"cannot open the database {self.engine.url.render_as_string(hide_password=True)}: "
                              f"{reason}; check --db (and that the database server is running)") from None
        except Exception:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine.execution_options(**{_READ_ONLY: True}), expire_on_commit=False)

    def insert(self, model: type[Base]):
        """INSERT with the dialect's ON CONFLICT clauses (on_conflict_do_nothing / _do_update)."""
        return (sqlite if self.is_sqlite else postgresql).insert(model)

    def _check_columns(self) -> None:
        """A database whose revision says it is current but lacks a column (edited by hand, or a model
        changed without a revision): say so at start-up, not with a failed query later."""
        found = inspect(self.engine)
        missing = [f"{table.name}.{column.name}" for table in Base.metadata.sorted_tables
                   for column in table.columns
                   if column.name not in {c["name"] for c in found.get_columns(table.name)}]
        if missing:
            raise ConfigError(f"the database {self.engine.url.render_as_string(hide_password=True)} was created by an "
                              f"earlier version of tailoredgen-train and lacks {', '.join(missing[:5])}"
                              f"{' ...' if len(missing) > 5 else ''}; start the service with a new --data-dir "
                              "(or --db), or add the columns")

    def file(self) -> list[Path]:
        """The SQLite database file, when the database is one ([] for a server database or :memory:)."""
        database = self.engine.url.database if self.is_sqlite else None
        return [Path(database)] if database and database != ":memory:" else []

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed when the block ends, rolled back if it raises."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A unit of work that only reads: no write lock, so a long write elsewhere never delays it."""
        with self._read_sessions() as session, session.begin():
            yield session
            if session.new or session.dirty or session.deleted:
                raise RuntimeError("a read() transaction changed rows: use Database.transaction() to write")

    def dispose(self) -> None:
        self.engine.dispose()


def normalize_url(url: str) -> str:
    """postgresql:// (or postgres://) means psycopg 3, the driver this project ships with; only SQLite
    and PostgreSQL are supported."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url.removeprefix(prefix)
    if not url.startswith(("sqlite:", "postgresql+")):
        raise ConfigError(f"--db {url.split('://')[0]}://...: use sqlite:///PATH or postgresql://USER@HOST/DATABASE")
    return url


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling would BEGIN DEFERRED; the "begin" hook issues BEGIN IMMEDIATE
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; survives a kill -9
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()
