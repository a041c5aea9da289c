"""JobRunner: claims, launches, watches and reconciles training jobs; the database is the truth.

One `poll()` pass looks at every model that is InProgress or Stopping: it records checkpoints as
they land, notices when the job's process is gone, and settles the model from the job's outcome
file (Completed, Failed with the engine's code, Stopped). A job that vanished without an outcome
(the server or the node died) is relaunched from its last checkpoint or marked Failed, as
`lost_jobs` says. The same pass runs at start-up before the server accepts requests: that is the
restart reconciliation.

Several replicas may share the database: every replica on the job's host (any replica, for Slurm)
watches it, and each settlement or relaunch is one conditional UPDATE that only one of them wins,
so a job is settled exactly once, whichever replica launched it and whether it is still alive.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from sqlalchemy import case, func, select, update

from ..engine.checkpoint import Checkpointer
from ..errors import RateLimitedError, TrainingAlreadyStartedError
from ..outcome import read_outcome
from ..recipe import JobSpec
from .db import Checkpoint, Database, Model, TokenLimit, TrainingJob, utcnow
from .launchers import Backend, JobHandle
from .settings import ServiceSettings

log = logging.getLogger(__name__)
ACTIVE = ("InProgress", "Stopping")
LAUNCH_GRACE_S = 300.0
"""a claim still without a live job this long after it was made lost its launcher (a replica or the
server died between claim and launch); longer than any launch takes (sbatch is given 60 s)"""


class JobRunner:
    def __init__(self, db: Database, backend: Backend, settings: ServiceSettings):
        self.db = db
        self.backend = backend
        self.settings = settings
        self.host = socket.gethostname()
        self._verified: set[tuple[int, int]] = set()  # (model, step) checkpoints already recorded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    def run_dir(self, model_id: int) -> Path:
        return self.settings.data_dir / "runs" / f"model-{model_id}"

    # ---- starting and stopping -----------------------------------------------------------------

    def claim(self, model_id: int, owner: str, params: dict, generation_prefix: str | None) -> None:
        """Created -> InProgress in one conditional UPDATE: of concurrent starts exactly one wins.
        The per-token training cap is checked in the same transaction, after the claim, so that a
        model that is already started answers 409 rather than 429. The token's row is locked first:
        on PostgreSQL two claims of one token would otherwise each count without the other's."""
        with self.db.transaction() as session:
            session.execute(self.db.insert(TokenLimit).values(token=owner, due=0.0)
                            .on_conflict_do_update(index_elements=[TokenLimit.token], set_={"token": owner}))
            claimed = session.execute(
                update(Model).where(Model.id == model_id, Model.status == "Created").values(
                    status="InProgress", owner=owner, training_parameters=params,
                    generation_prefix=generation_prefix, updated_at=utcnow())
            ).rowcount
            if claimed != 1:
                raise TrainingAlreadyStartedError(
                    f"Training already started/cannot be resumed: model {model_id} is no longer 'Created'. "
                    "Create a new model to train again.")
            active = session.scalar(select(func.count()).select_from(Model).where(
                Model.owner == owner, Model.status.in_(ACTIVE)))
            if active > self.settings.max_concurrent_trainings:
                raise RateLimitedError(  # raising rolls the claim back
                    f"Request limit exceeded: this token already has {active - 1} trainings running, the cap is "
                    f"{self.settings.max_concurrent_trainings}. Stop one or wait for one to finish.", retry_after_s=60)

    def submit(self, model_id: int, job: JobSpec) -> None:
        """Launch an already-claimed model's job; a launch that fails marks the model Failed."""
        with self.db.transaction() as session:
            attempt = (session.scalar(select(func.max(TrainingJob.attempt)).where(TrainingJob.model_id == model_id))
                       or 0) + 1
        try:
            handle = self.backend.submit(job)
        except Exception as exc:
            self._settle(model_id, None, "Failed", code="launch_failed",
                         message=f"the job could not be launched: {exc}")
            raise
        with self.db.transaction() as session:
            session.add(TrainingJob(model_id=model_id, attempt=attempt, run_dir=str(job.output_dir),
                                    launcher=handle.launcher, host=handle.host, external_id=handle.external_id,
                                    process_started=handle.process_started))
        log.info("model %s: launched attempt %s (%s %s)", model_id, attempt, handle.launcher, handle.external_id)

    def request_stop(self, model_id: int) -> bool:
        """InProgress -> Stopping and SIGTERM to the job; False when the model was not training."""
        with self.db.transaction() as session:
            changed = session.execute(update(Model).where(Model.id == model_id, Model.status == "InProgress").values(
                status="Stopping", stop_requested_at=time.time(), updated_at=utcnow())).rowcount
            job = self._latest_job(session, model_id)
        if changed != 1:
            return False
        if job is not None and self._owns(job):
            self.backend.stop(_handle(job))
        return True

    # ---- watching --------------------------------------------------------------------------------

    def start_watching(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="tailoredgen-job-watcher", daemon=True)
        self._thread.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive one bad pass (a locked database, a full disk)
                log.exception("job watcher pass failed; retrying in %.1f s", self.settings.poll_interval_s)

    def poll(self, *, startup: bool = False) -> None:
        """One pass over the active models. A claimed model without a live job is one whose launcher
        died: at once at an SQLite server's start-up, else when the claim is LAUNCH_GRACE_S old."""
        with self._poll_lock:
            with self.db.transaction() as session:
                models = session.execute(select(Model.id, Model.status, Model.stop_requested_at, Model.updated_at)
                                         .where(Model.status.in_(ACTIVE))).all()
                jobs = {m.id: self._latest_job(session, m.id) for m in models}
            for model in models:
                job = jobs[model.id]
                if job is None or job.ended_at is not None:  # not launched yet, or being relaunched
                    # at start-up on SQLite (one server per database) no request is between claim and launch
                    if (startup and self.db.is_sqlite) or self._launch_overdue(model.updated_at):
                        self._lost(model.id, model.status, None)
                elif self._owns(job):
                    self._check(model.id, model.status, model.stop_requested_at, job)

    def _check(self, model_id: int, status: str, stop_requested_at: float | None, job: TrainingJob) -> None:
        self._record_checkpoints(model_id, job)
        handle = _handle(job)
        if self.backend.is_running(handle):
            grace = self.settings.stop_grace_s
            if status == "Stopping" and stop_requested_at and time.time() - stop_requested_at > grace:
                log.warning("model %s: job did not stop within %.0f s; killing it", model_id, grace)
                self.backend.kill(handle)
            return
        self._record_checkpoints(model_id, job)  # the last one may have landed just before the exit
        outcome = read_outcome(job.run_dir)
        state = outcome["status"] if outcome else None
        if state == "completed":
            self._settle(model_id, job, "Completed", final_step=outcome.get("final_step"))
        elif status == "Stopping" or state == "stopped":  # asked to stop, or stopped itself (stop_after_steps)
            self._settle(model_id, job, "Stopped")
        elif state == "failed":
            self._settle(model_id, job, "Failed", code=outcome.get("code"), message=outcome.get("message"))
        else:  # killed, or preempted by someone else (Slurm, the node): the run itself is resumable
            self._lost(model_id, status, job)

    def _lost(self, model_id: int, status: str, job: TrainingJob | None) -> None:
        if status == "Stopping":
            self._settle(model_id, job, "Stopped")
            return
        attempts = job.attempt if job else 0
        if self.settings.lost_jobs == "resume" and job is not None and attempts - 1 < self.settings.max_resume_attempts:
            spec = JobSpec.from_dict(json.loads((Path(job.run_dir) / "job.json").read_text()))
            spec.resume, spec.overwrite = True, False
            if not self._end_job(job.id, "lost", relaunch=True):
                return  # another replica saw it first and relaunches it
            log.warning("model %s: its job is gone without a result; resuming from its last checkpoint", model_id)
            self.submit(model_id, spec)
            return
        reason = ("the training process was gone without a result when the server checked it "
                  f"(lost_jobs={self.settings.lost_jobs}")
        reason += f", {attempts} attempts)" if self.settings.lost_jobs == "resume" else ")"
        self._settle(model_id, job, "Failed", code="job_lost",
                     message=reason + "; its published checkpoints are kept. Create a new model to train again.")

    def _settle(self, model_id: int, job: TrainingJob | None, status: str, *, final_step: int | None = None,
                code: str | None = None, message: str | None = None) -> None:
        values = {"status": status, "updated_at": utcnow()}
        if status == "Completed" and final_step:
            values["active_model_version"] = case((Model.training_mode == "expert", str(final_step)),
                                                  else_=Model.active_model_version)
        if status == "Failed":
            values.update(error_code=code or "internal_error", error_message=message or "the job failed")
        with self.db.transaction() as session:  # conditional: of replicas settling together one wins
            settled = session.execute(update(Model).where(Model.id == model_id, Model.status.in_(ACTIVE))
                                      .values(**values)).rowcount
        if settled != 1:
            return
        if job is not None:
            self._end_job(job.id, status.lower())
        log.info("model %s: %s%s", model_id, status, f" [{code}]" if code else "")

    def _end_job(self, job_id: int, outcome: str, *, relaunch: bool = False) -> bool:
        """False when the job had already ended (another replica ended it). `relaunch`: the model's
        claim time restarts, so that no replica takes the relaunch for a lost launch."""
        with self.db.transaction() as session:
            ended = session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.ended_at.is_(None))
                                    .values(ended_at=utcnow(), outcome=outcome)).rowcount == 1
            if ended and relaunch:
                session.execute(update(Model).where(Model.id == select(TrainingJob.model_id).where(
                    TrainingJob.id == job_id).scalar_subquery()).values(updated_at=utcnow()))
            return ended

    def _record_checkpoints(self, model_id: int, job: TrainingJob) -> None:
        checkpointer = Checkpointer(Path(job.run_dir), is_main_process=False)
        new = [s for s in checkpointer.published_steps() if (model_id, s) not in self._verified]
        if not new:
            return
        with self.db.transaction() as session:
            known = set(session.scalars(select(Checkpoint.step).where(Checkpoint.model_id == model_id)))
            for step in sorted(new):
                if step not in known and Checkpointer.verify(checkpointer.path_for(step)):
                    # another replica may record the same step at the same moment: the first row stays
                    session.execute(self.db.insert(Checkpoint).values(model_id=model_id, training_job_id=job.id,
                                                                      step=step, created_at=utcnow())
                                    .on_conflict_do_nothing(index_elements=["model_id", "step"]))
                    known.add(step)
        self._verified.update((model_id, s) for s in known)

    @staticmethod
    def _latest_job(session, model_id: int) -> TrainingJob | None:
        return session.scalar(select(TrainingJob).where(TrainingJob.model_id == model_id)
                              .order_by(TrainingJob.attempt.desc()).limit(1))

    @staticmethod
    def _launch_overdue(claimed_at: str) -> bool:
        return (datetime.fromisoformat(utcnow()) - datetime.fromisoformat(claimed_at)).total_seconds() > LAUNCH_GRACE_S

    def _owns(self, job: TrainingJob) -> bool:
        """A local process can only be watched from its own host; a Slurm job from anywhere."""
        return job.launcher != "local" or job.host == self.host


def _handle(job: TrainingJob) -> JobHandle:
    return JobHandle(job.launcher, job.external_id or "", job.host, job.process_started)

