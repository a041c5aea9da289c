"""JobRunner: claims, launches, watches and reconciles training jobs; the database is the truth.

One `poll()` pass looks at every model that is InProgress or Stopping: it records checkpoints as
they land, notices when the job's process is gone, and settles the model from the job's outcome
file (Completed, Failed with the engine's code, Stopped). A job that vanished without an outcome
(the server or the node died) is relaunched from its last checkpoint or marked Failed, as
`lost_jobs` says. The same pass runs at start-up before the server accepts requests: that is the
restart reconciliation.

A job is a TrainingJob row before it is a process: queued (no launch_token) until the backend has a
free GPU slice for it, then given a launch token that is committed before the process starts and
that the process carries in its environment. So a server killed during a launch leaves a row by
which its successor finds the process (and adopts it) or knows that none was started. A stop is
durable too: the model row says Stopping and the run folder gets the stop file before anyone looks
for the process, so whichever comes first, the process or the stop, the job ends Stopped.

Several replicas may share the database: every replica on the job's host (any replica, for Slurm)
watches it, and each settlement or relaunch is one conditional UPDATE that only one of them wins,
so a job is settled exactly once, whichever replica launched it and whether it is still alive.
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil
from sqlalchemy import case, func, select, update

from ..engine.checkpoint import Checkpointer
from ..engine.preemption import request_stop as write_stop_file
from ..errors import RateLimitedError, TrainingAlreadyStartedError
from ..outcome import read_outcome
from ..recipe import JOB_FILE_STAGING, JobSpec
from ..start import write_job_file
from .cleanup import prune_finished_run
from .db import Checkpoint, Database, Dataset, Model, TokenLimit, TrainingJob, utcnow
from .launchers import Backend, JobHandle, Launch
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
        self._launch_lock = threading.Lock()  # one launcher at a time hands out GPU slices

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
            # the dataset's row, shared: a delete of the dataset (FOR UPDATE) and this claim run one after the other
            session.execute(select(Dataset.id).where(Dataset.id == select(Model.dataset_id).where(
                Model.id == model_id).scalar_subquery()).with_for_update(read=True))
            claimed = session.execute(
                # its dataset must still be completed: a dataset deleted since the start was checked stays unused
                update(Model).where(Model.id == model_id, Model.status == "Created", Model.dataset_id.in_(
                    select(Dataset.id).where(Dataset.status == "completed"))).values(
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
        """Queue an already-claimed model's job, then launch what the free GPU slices allow; a launch
        that fails marks its model Failed (and raises, for this model's request)."""
        write_job_file(job)  # what the queued job is started from
        with self.db.transaction() as session:
            attempt = (session.scalar(select(func.max(TrainingJob.attempt)).where(TrainingJob.model_id == model_id))
                       or 0) + 1
            session.add(TrainingJob(model_id=model_id, attempt=attempt, run_dir=str(job.output_dir),
                                    launcher=self.backend.name, host=self.host))
        self.launch_queued(raise_for=model_id)

    def launch_queued(self, raise_for: int | None = None) -> None:
        """Start this host's queued jobs, oldest first, while the backend has a free GPU slice."""
        with self._launch_lock:
            while (next_job := self._take_next()) is not None:
                try:
                    self._launch(*next_job)
                except Exception:
                    if next_job[0].model_id == raise_for:
                        raise
                    log.exception("model %s: launch failed", next_job[0].model_id)

    def _take_next(self) -> tuple[TrainingJob, Launch] | None:
        """The oldest queued job of this host with its launch token and GPUs, committed before any
        process exists; None when no job waits or no slice is free."""
        with self.db.transaction() as session:
            job = session.scalar(select(TrainingJob).where(
                TrainingJob.host == self.host, TrainingJob.launch_token.is_(None), TrainingJob.ended_at.is_(None))
                .order_by(TrainingJob.id).limit(1))
            if job is None:
                return None
            devices = []
            if self.backend.slices is not None:
                held = session.scalars(select(TrainingJob.devices).join(Model, Model.id == TrainingJob.model_id).where(
                    TrainingJob.host == self.host, TrainingJob.ended_at.is_(None), TrainingJob.devices.is_not(None),
                    Model.status.in_(ACTIVE)))
                devices = self.backend.slices.free(gpu for row in held for gpu in row.split(","))
                if devices is None:
                    return None
            launch = Launch(secrets.token_hex(16), devices)
            taken = session.execute(update(TrainingJob).where(
                TrainingJob.id == job.id, TrainingJob.launch_token.is_(None), TrainingJob.ended_at.is_(None))
                .values(launch_token=launch.token, devices=",".join(devices) or None)).rowcount
        return (job, launch) if taken == 1 else self._take_next()  # a stop ended it meanwhile: the next one

    def _launch(self, job: TrainingJob, launch: Launch) -> None:
        if self._status(job.model_id) != "InProgress":  # stopped while it waited: it never runs
            self._settle(job.model_id, job, "Stopped")
            self._end_job(job.id, "stopped")  # also when the model was settled already
            return
        spec = JobSpec.from_dict(json.loads((Path(job.run_dir) / "job.json").read_text()))
        try:
            handle = self.backend.submit(spec, launch)
        except Exception as exc:
            self._settle(job.model_id, job, "Failed", code="launch_failed",
                         message=f"the job could not be launched: {exc}")
            raise
        self._record_handle(job.id, handle)
        log.info("model %s: launched attempt %s (%s %s%s)", job.model_id, job.attempt, handle.launcher,
                 handle.external_id, f", GPUs {','.join(launch.devices)}" if launch.devices else "")
        if self._status(job.model_id) == "Stopping":  # the stop came during the launch and found no process
            self.backend.stop(handle)

    def _record_handle(self, job_id: int, handle: JobHandle) -> None:
        with self.db.transaction() as session:
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(
                external_id=handle.external_id, process_started=handle.process_started))

    def _status(self, model_id: int) -> str | None:
        with self.db.transaction() as session:
            return session.scalar(select(Model.status).where(Model.id == model_id))

    def queue_position(self, model_id: int) -> int | None:
        """1 when the model's job is the next its host starts; None when it is not waiting."""
        with self.db.transaction() as session:
            queued = session.execute(select(TrainingJob.model_id, TrainingJob.host).where(
                TrainingJob.launch_token.is_(None), TrainingJob.ended_at.is_(None)).order_by(TrainingJob.id)).all()
        hosts = {m: h for m, h in queued}
        if model_id not in hosts:
            return None
        ahead = [m for m, h in queued if h == hosts[model_id]]
        return ahead.index(model_id) + 1

    def request_stop(self, model_id: int) -> bool:
        """InProgress -> Stopping, durably: a queued job is ended before it ever runs; a launched one
        finds the stop file whenever it looks (start-up, after loading, each step) and gets SIGTERM
        once its process is known (here, or by _launch). False when the model was not training."""
        with self.db.transaction() as session:
            changed = session.execute(update(Model).where(Model.id == model_id, Model.status == "InProgress").values(
                status="Stopping", stop_requested_at=time.time(), updated_at=utcnow())).rowcount
            never_ran = changed and session.execute(update(TrainingJob).where(
                TrainingJob.model_id == model_id, TrainingJob.launch_token.is_(None), TrainingJob.ended_at.is_(None))
                .values(ended_at=utcnow(), outcome="stopped")).rowcount
            if never_ran:  # in the same transaction: a queued job and its model end together
                session.execute(update(Model).where(Model.id == model_id).values(status="Stopped", updated_at=utcnow()))
        if changed != 1:
            return False
        if never_ran:
            return True
        write_stop_file(self.run_dir(model_id))  # before looking for the process: see _launch
        with self.db.transaction() as session:
            job = self._latest_job(session, model_id)
        if job is not None and job.external_id and self._owns(job):
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
            if startup:
                self._remove_dead_job_file_staging()
            with self.db.transaction() as session:
                models = session.execute(select(Model.id, Model.status, Model.stop_requested_at, Model.updated_at)
                                         .where(Model.status.in_(ACTIVE))).all()
                jobs = {m.id: self._latest_job(session, m.id) for m in models}
            for model in models:
                job = jobs[model.id]
                if job is None or job.ended_at is not None:  # not queued yet, or being relaunched
                    # at start-up on SQLite (one server per database) no request is between claim and queue
                    if (startup and self.db.is_sqlite) or self._launch_overdue(model.updated_at):
                        self._lost(model.id, model.status, None)
                elif job.launch_token is None or not self._owns(job):
                    continue  # queued (launch_queued starts it), or another host's process
                elif not job.external_id:
                    if startup:  # the server died during the launch; else this server is launching it now
                        self._adopt_or_lose(model.id, model.status, model.stop_requested_at, job)
                else:
                    self._check(model.id, model.status, model.stop_requested_at, job)
            self.launch_queued()  # the slices the settled jobs freed

    def _remove_dead_job_file_staging(self) -> None:
        """The half-written job.json a server of this host left when it was killed writing one."""
        prefix = f"{JOB_FILE_STAGING}{self.host}-"
        for path in (self.settings.data_dir / "runs").glob(f"model-*/{prefix}*"):
            pid = path.name[len(prefix):]
            if not (pid.isdigit() and psutil.pid_exists(int(pid))):
                path.unlink(missing_ok=True)

    def _adopt_or_lose(self, model_id: int, status: str, stop_requested_at: float | None, job: TrainingJob) -> None:
        """A job whose launch an earlier server began but never recorded: its process, found by the
        launch token, is adopted (and stopped, if a stop was accepted); no process means none started."""
        handle = self.backend.find(job.launch_token)
        if handle is None:
            self._lost(model_id, status, job)
            return
        self._record_handle(job.id, handle)
        job.external_id, job.process_started = handle.external_id, handle.process_started
        log.warning("model %s: adopted process %s, launched by an earlier server that did not record it",
                    model_id, handle.external_id)
        if status == "Stopping":
            write_stop_file(job.run_dir)
            self.backend.stop(handle)
        self._check(model_id, status, stop_requested_at, job)

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
        if status == "Stopping" or state == "stopped":  # a stop wins; or it stopped itself (stop_after_steps)
            self._settle(model_id, job, "Stopped")
        elif state == "completed":
            self._settle(model_id, job, "Completed", final_step=outcome.get("final_step"))
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
        if job is not None and self.settings.prune_finished_runs:  # first: whoever sees the status finds it done
            prune_finished_run(Path(job.run_dir))
        values = {"status": status, "updated_at": utcnow()}
        if status == "Completed" and final_step:
            values["active_model_version"] = case((Model.training_mode == "expert", str(final_step)),
                                                  else_=Model.active_model_version)
        if status == "Failed":
            values.update(error_code=code or "internal_error", error_message=message or "the job failed")
        with self.db.transaction() as session:  # conditional: of replicas settling together one wins
            # a stop that was accepted wins over how the job ended
            settled = session.execute(update(Model).where(Model.id == model_id, Model.status == "Stopping")
                                      .values(status="Stopped", updated_at=utcnow())).rowcount
            if settled == 1:
                status, code = "Stopped", None
            else:
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
