"""The LoRA fine-tuning recipe: wire a family, the data, the cache, the optimizer and the trainer.

`run_training(job)` is what every entry point ends in: the CLI, `python -m tailoredgen_train`
under `accelerate launch` (one call per process), and the jobs `start_training` launches.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import socket
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from . import __version__
from .config import EngineConfig, engine_config_from_dict
from .contract import TrainingParameters, canonical_version
from .data import BucketBatchSampler, nearest_bucket, scale_buckets, validate_dataset
from .engine.cache import CacheItem, CachedFeatures, FeatureCache, TextFeatures, choose_text_features, entries_of, \
    fill_cache
from .engine.checkpoint import Checkpointer, Storage
from .engine.checkpoint_manager import CheckpointManager, any_process
from .engine.output_lock import lock_output
from .engine.preemption import STOP_FILE, StopFlag
from .engine.run_log import run_log
from .engine.lora import add_lora, lora_signature, set_lora_input_casting, trainable_parameters
from .engine.schedule import build_lr_scheduler
from .engine.speed import apply_block_policy, build_optimizer, bytes_of, resolve_checkpointing, resolve_host_sync
from .engine.trainer import StepRecord, Trainer, TrainerSettings
from .errors import ConfigError, OutputDirError, OutputInUseError, Preempted, ResumeError, TailoredGenError
from .families import family_for_config, load_version_map
from .outcome import clear_outcome, process_rank, write_outcome
from .report import MetricsLog, refresh_report, summarize_run
from .report.metrics import JOB_FILE

if TYPE_CHECKING:  # the inference stack is imported only by runs that render samples
    from .inference.validation import ValidationPlan, Validator

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    """Everything one training job needs; `job.json` in the output folder is this, serialised."""

    base: str
    dataset_dir: str
    output_dir: str
    training_version: str
    params: TrainingParameters
    engine: EngineConfig
    caption_prefix: str | None = None
    resume: bool = False
    overwrite: bool = False
    version_map: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "params": self.params.to_dict(), "engine": self.engine.to_dict()}

    def fingerprint(self) -> str:
        """What the run computes (not where it writes or whether it resumes): stored in manifests."""
        recipe = {k: v for k, v in self.to_dict().items() if k not in ("output_dir", "resume", "overwrite")}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobSpec:
        raw = dict(raw)
        raw.pop("engine_version", None)  # the copy the engine keeps in OUTPUT/job.json is stamped with it
        raw["params"] = TrainingParameters(**raw["params"])
        raw["engine"] = engine_config_from_dict(raw["engine"], source="job spec")
        return cls(**raw)


@dataclass
class TrainingResult:
    output_dir: Path
    checkpoints: list[Path]
    history: list[StepRecord]
    final_step: int
    """The step the run ended at: below total_training_steps when run.stop_after_steps cut it short."""
    denoiser: torch.nn.Module
    """The trained denoiser with its LoRA (unwrapped), for in-process callers."""


JOB_FILE_STAGING = f".{JOB_FILE}.tmp-"
"""+ HOST-PID: who was writing it, so that a restarted server removes only what a dead writer left"""


def save_job(job: JobSpec, path: Path) -> None:
    """OUTPUT/job.json (what `run-job` and `--resume` read), stamped with the engine version; staged,
    fsynced and renamed, never torn."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(staging, "w") as handle:
        json.dump({**job.to_dict(), "engine_version": __version__}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def _mixed_precision(config: EngineConfig) -> str:
    if config.run.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return config.run.mixed_precision


def _check_output_dir(job: JobSpec, checkpointer: Checkpointer, accelerator: Accelerator) -> None:
    """A fresh run never silently mixes its checkpoints with an earlier run's. Every process checks
    (so all fail together instead of waiting on a barrier); only the main one deletes."""
    if accelerator.is_main_process:
        for leftover in checkpointer.remove_leftovers():
            log.warning("removed %s, left behind by a process that died while writing it", leftover)
    existing = checkpointer.published_steps() or checkpointer.resume_steps()
    if job.resume or not existing:
        return
    if not job.overwrite:
        raise ResumeError(
            f"output directory {job.output_dir} already holds checkpoints (steps {sorted(set(existing))}): pass "
            "--resume to continue that run, --overwrite to discard it, or choose a new --output."
        )
    accelerator.wait_for_everyone()  # everyone has looked before anything disappears
    if accelerator.is_main_process:
        checkpointer.remove_all()


def check_writable_dir(path: Path, what: str, error: type[TailoredGenError]) -> None:
    """Refuse, before any model is loaded, a folder that cannot be created or written: `path` may
    not exist yet, but its nearest existing ancestor must be a writable folder."""
    for existing in (path, *path.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        problem = "is a file, not a folder" if existing == path else f"cannot be created: {existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
    else:
        return
    raise error(f"{what} {path} {problem}; choose a folder you can write to")


def _find_resume_state(checkpointer: Checkpointer) -> Path | None:
    """The newest resume state that verifies, or None when none was ever committed (a process
    killed before its first resume state: the run restarts and rewrites the same LoRA files).
    States that exist but all fail to verify are refused, never silently replaced by a restart."""
    latest = checkpointer.latest_resume()
    if latest is None and checkpointer.resume_steps():
        raise ResumeError(
            f"--resume: every resume state in {checkpointer.resume_root} is damaged (its manifest does not verify). "
            "The published LoRA files are untouched; to train again use --overwrite or a new --output."
        )
    return latest


def make_accelerator(config: EngineConfig, output_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        # without a GPU, accelerate forms a gloo group only when told it runs on CPU
        cpu=not torch.cuda.is_available(),
        mixed_precision=_mixed_precision(config),
        log_with=None if config.run.log_with == "none" else config.run.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.device.type == "cuda":
        # cuDNN SDPA's backward crashes at FIBO shapes (docs/PERFORMANCE.md); flash/efficient remain
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = config.run.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.run.allow_tf32
    return accelerator


def _cache_features(family, model, samples, buckets, config: EngineConfig, output_dir: Path,
                    accelerator: Accelerator) -> tuple[FeatureCache, list[CacheItem], int, bool]:
    """Encode every sample once (each process a share), then free the encoders for good: all of
    them, or all but the text encoder when the text features are encoded online (returned True)."""
    online = choose_text_features(
        config.data.text_features, has_text_features=bool(family.text_feature_keys),
        cache_bytes=lambda: sum(_bytes_of_specs(family.text_feature_specs(model, s.caption)) for s in samples),
        budget_gib=config.data.text_cache_budget_gib) == "online"
    cache_dir = Path(config.run.cache_dir) if config.run.cache_dir else output_dir / "cache"
    options = json.dumps(dataclasses.asdict(family.options), sort_keys=True)
    # image-only entries never pass for complete ones
    namespace = f"{family.name}:{model.fingerprint}:{options}" + (":image-features" if online else "")
    cache = FeatureCache(cache_dir, namespace=namespace)
    items = [cache.item(s, nearest_bucket(s.width, s.height, buckets)) for s in samples]

    def encode(pixels, caption, geometry):
        if online:
            return {key: value.cpu() for key, value in family.encode_image(model, pixels, geometry).items()}
        return family.encode_sample(model, pixels, caption, geometry)

    encoded = fill_cache(cache, items, encode, rank=accelerator.process_index, world_size=accelerator.num_processes,
                         max_pixels=config.data.max_pixels)
    accelerator.wait_for_everyone()
    family.release_encoders(model, keep_text=online)
    gc.collect()
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return cache, items, encoded, online


def _bytes_of_specs(specs: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in specs.values())


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32


@dataclass
class TrainingSetup:
    trainer: Trainer
    items: list[CacheItem]
    buckets: list[tuple[int, int]]
    encoded: int
    num_trainable: int
    batches_per_epoch: int
    checkpointing: int | bool
    """Blocks that recompute their activations: True (all), False (none) or a count."""


def prepare_training(job: JobSpec, family, model, samples, accelerator: Accelerator, checkpointer: Checkpointer,
                     stop_flag: StopFlag, validation: ValidationPlan | None = None,
                     render_components: dict | None = None) -> TrainingSetup:
    """From a loaded base to a ready Trainer: LoRA, feature cache, loader, optimizer, speed levers,
    validation renders. `train` and scripts/bench.py both go through here, so the benchmark times
    the real step. `render_components`: the renderer's text encoder/VAE/... when there is no base
    folder to load them from (the benchmark's random full-size model)."""
    config, params = job.engine, job.params
    output_dir = Path(job.output_dir)
    targets = config.lora.target_modules or list(family.default_lora_targets)
    num_trainable = add_lora(model.denoiser, rank=params.rank, targets=targets, init=config.lora.init)
    # the step runs under autocast when bf16: PEFT's cast of each LoRA input to fp32 is undone at once
    set_lora_input_casting(model.denoiser, enabled=accelerator.mixed_precision == "no")

    buckets = scale_buckets(family.bucket_base, config.data.resolution, family.bucket_multiple)
    cache, items, encoded, online = _cache_features(family, model, samples, buckets, config, output_dir, accelerator)

    trainable = trainable_parameters(model.denoiser)
    blocks = family.denoiser_blocks(model.denoiser)
    block_bytes = None
    if config.run.gradient_checkpointing == "auto":
        estimates = [family.block_activation_bytes(model.denoiser, _feature_shapes(family, model, cache, item, online),
                                                   config.data.batch_size) for item in items]
        block_bytes = None if None in estimates else max(estimates, default=0)
    checkpointing = resolve_checkpointing(config.run.gradient_checkpointing, device=accelerator.device,
                                          num_blocks=len(blocks), block_bytes=block_bytes,
                                          trainable_bytes=bytes_of(trainable), optimizer=config.optim.optimizer)
    apply_block_policy(model.denoiser, blocks, checkpointing=checkpointing, compile_blocks=config.run.compile_blocks,
                       device=accelerator.device)

    accumulation = config.accumulation_steps(accelerator.num_processes)  # refuses a global batch that does not divide
    # one global order of micro-batches, whatever the number of processes (no per-process padding)
    sampler = BucketBatchSampler([item.bucket for item in items], config.data.batch_size, config.run.seed)
    # workers (if any) pass only image features; text features are read or encoded in this process
    dataset = CachedFeatures(cache, items, family.text_feature_keys)
    with_text = TextFeatures(cache, items, family.text_feature_keys, family.collate, device=accelerator.device,
                             encode=(lambda caption: family.encode_text(model, caption)) if online else None)

    def batches_from(cursor: int):
        # global micro-batch j goes to process j % P (micro_batch_position in the trainer);
        # pinned host entries: the .to(device, non_blocking=True) copies overlap the host
        order = sampler.iter_from(cursor + accelerator.process_index, stride=accelerator.num_processes)
        return map(with_text, torch.utils.data.DataLoader(
            dataset, batch_sampler=order, collate_fn=entries_of,
            num_workers=config.data.num_workers, pin_memory=accelerator.device.type == "cuda",
        ))

    optim = config.optim
    optimizer = build_optimizer(trainable, learning_rate=params.learning_rate, config=config,
                                device=accelerator.device)
    # not passed to accelerator.prepare: its wrapper steps the schedule once per process
    lr_scheduler = build_lr_scheduler(optimizer, params, optim)
    denoiser = accelerator.prepare(model.denoiser)

    identity = {
        "family": family.name,
        "base_fingerprint": model.fingerprint,
        "lora": lora_signature(model.denoiser),
        "training_parameters": params.to_dict(),
        "engine_config": config.to_dict(),
    }
    checkpoints = CheckpointManager(checkpointer, family=family, accelerator=accelerator, optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, identity=identity)
    trainer = Trainer(
        family=family, denoiser=denoiser, optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator,
        batches_from=batches_from, checkpoints=checkpoints,
        sample_ids=[item.sample.sample_id for item in items],
        settings=TrainerSettings(
            total_steps=params.total_training_steps, checkpoint_steps=params.checkpoint_steps(),
            gradient_accumulation_steps=accumulation, max_grad_norm=optim.max_grad_norm,
            seed=config.run.seed, log_every=config.run.log_every, log_samples=config.run.log_samples,
            max_consecutive_nonfinite=optim.max_consecutive_nonfinite, stop_after_steps=config.run.stop_after_steps,
            sync_every_step=resolve_host_sync(config.run.host_sync, optimizer, accelerator.device),
        ),
        stop_flag=stop_flag,
        validator=_validator(validation, family, job, accelerator, render_components),
    )
    return TrainingSetup(trainer=trainer, items=items, buckets=buckets, encoded=encoded, num_trainable=num_trainable,
                         batches_per_epoch=sampler.batches_per_epoch, checkpointing=checkpointing)


def _feature_shapes(family, model, cache: FeatureCache, item: CacheItem, online: bool) -> dict[str, tuple[int, ...]]:
    """A sample's feature shapes as a step sees them (the text part from its specs when online)."""
    shapes = cache.shapes(item)
    if online:
        shapes.update({k: tuple(v.shape) for k, v in family.text_feature_specs(model, item.sample.caption).items()})
    return shapes


def _validator(plan: ValidationPlan | None, family, job: JobSpec, accelerator: Accelerator,
               render_components: dict | None) -> Validator | None:
    if plan is None:
        return None
    from .inference.render import TrainingRenderer
    from .inference.validation import Validator

    renderer = TrainingRenderer(family, job.base, device=accelerator.device, weight_dtype=weight_dtype_for(accelerator),
                                components=render_components)
    return Validator(plan, renderer, output_dir=Path(job.output_dir), accelerator=accelerator)


class RunOutcome:
    """Leaves OUTPUT/result.json (how the run ended, with its summary) and a final report.html, once
    the output folder is this run's: after its checks, so that a refused run never overwrites the
    result of the run already in that folder, or from the start for a folder made for the job."""

    def __init__(self, output_dir: Path, *, owned: bool):
        self.output_dir = output_dir
        self.owned = owned
        self.started = time.time()

    def take_ownership(self, is_main_process: bool) -> None:
        if is_main_process:
            clear_outcome(self.output_dir)  # a previous attempt's result is not this one's
        self.owned = True

    def record(self, error: BaseException | None, final_step: int = 0, total_steps: int = 0) -> None:
        if not self.owned or isinstance(error, OutputInUseError):  # the folder is another run's
            return
        main = process_rank() == 0
        summary = summarize_run(self.output_dir, started_at=self.started) if main else None
        if error is None and final_step < total_steps:
            write_outcome(self.output_dir, "stopped", code="stop_after_steps", final_step=final_step, summary=summary,
                          message=f"stopped after step {final_step} of {total_steps} (run.stop_after_steps); "
                                  "--resume continues")
        elif error is None:
            write_outcome(self.output_dir, "completed", final_step=final_step, summary=summary)
        elif isinstance(error, Preempted):
            write_outcome(self.output_dir, "preempted", code=error.code, message=error.message, summary=summary)
        elif isinstance(error, TailoredGenError):
            write_outcome(self.output_dir, "failed", code=error.code, message=error.message, summary=summary)
        else:
            write_outcome(self.output_dir, "failed", code="internal_error",
                          message=f"{type(error).__name__}: {error}", summary=summary)
        if main:
            refresh_report(self.output_dir)


def run_training(job: JobSpec, *, storage: Storage | None = None, output_is_ours: bool = False) -> TrainingResult:
    """Run one job to its last step. SIGTERM/SIGINT stop it at a step boundary (Preempted, after
    saving resume state), and so does OUTPUT/stop-requested, checked at start-up, after loading and
    at each step boundary; `storage` is the checkpoint file-system seam (tests inject faults).
    OUTPUT/result.json says how it ended, from the moment the folder is the run's (see RunOutcome;
    `output_is_ours`: the caller made the folder for this job, as the service does). A process
    that is killed writes nothing: no file means the run was lost, not that it failed. One job
    per folder: the main process holds OUTPUT/train.lock for the run's life (OutputInUseError)."""
    stop_flag = StopFlag(Path(job.output_dir) / STOP_FILE).install()
    outcome = RunOutcome(Path(job.output_dir), owned=output_is_ours)
    try:
        with ExitStack() as scope:
            try:
                result = _run(job, storage, stop_flag, scope, outcome)
            except Exception as exc:
                outcome.record(exc)
                raise
            outcome.record(None, final_step=result.final_step, total_steps=job.params.total_training_steps)
            return result
    finally:
        stop_flag.restore()


def _run(job: JobSpec, storage: Storage | None, stop_flag: StopFlag, scope: ExitStack,
         outcome: RunOutcome) -> TrainingResult:
    _stop_if_requested(stop_flag, None, "before it started")
    config, params = job.engine, job.params
    version_map = load_version_map(job.version_map)
    family = family_for_config(job.training_version, config, version_map)
    family.check_base(job.base)  # a wrong or missing base is refused before any work starts
    family.check_caption_prefix(job.caption_prefix)
    output_dir = Path(job.output_dir)
    check_writable_dir(output_dir, "--output (the run folder)", OutputDirError)
    if config.run.cache_dir:
        check_writable_dir(Path(config.run.cache_dir), "run.cache_dir", ConfigError)
    # before anything is written: a second job in the folder is refused and leaves the first's files alone
    lock = lock_output(output_dir, is_main_process=process_rank() == 0)
    if lock is not None:
        scope.callback(lock.release)  # after result.json: the run's last write
    accelerator = make_accelerator(config, output_dir)
    config.accumulation_steps(accelerator.num_processes)  # a global batch the processes cannot share: refused now
    main = accelerator.is_main_process
    checkpointer = Checkpointer(output_dir, is_main_process=main, storage=storage, config_hash=job.fingerprint())
    _check_output_dir(job, checkpointer, accelerator)
    accelerator.wait_for_everyone()
    outcome.take_ownership(main)
    if main:  # from the start: `train --output DIR --resume` reads it back (saved_job.py)
        save_job(job, output_dir / JOB_FILE)
    scope.enter_context(run_log(output_dir, is_main_process=main))  # OUTPUT/train.log from here on

    report = validate_dataset(job.dataset_dir, caption_format=family.caption_format, min_side=config.data.min_side,
                              max_pixels=config.data.max_pixels, caption_prefix=job.caption_prefix)
    report.raise_if_invalid()
    samples = report.samples
    # the prompts are checked now: a bad one fails before any model is loaded, not at step 100
    validation = None
    if config.validation.enabled:
        from .inference.validation import plan_validation

        validation = plan_validation(config, family, [(s.sample_id, s.caption) for s in samples], job.caption_prefix)

    # the LoRA init is the only draw from the global generators; the same seed gives the same run
    set_seed(config.run.seed)
    model = family.load(job.base, device=accelerator.device, weight_dtype=weight_dtype_for(accelerator))
    _stop_if_requested(stop_flag, accelerator, "after loading the base model")
    setup = prepare_training(job, family, model, samples, accelerator, checkpointer, stop_flag, validation)
    _stop_if_requested(stop_flag, accelerator, "after caching the dataset")
    trainer = setup.trainer
    if main:  # OUTPUT/metrics.jsonl, and report.html rebuilt at each checkpoint
        trainer.record_steps = scope.enter_context(closing(MetricsLog(output_dir))).extend
        trainer.after_checkpoint = lambda step: refresh_report(output_dir)
    if job.resume:
        latest = _find_resume_state(checkpointer)
        if latest is None:
            log.warning("--resume: no resume state in %s yet; starting from step 0 (any LoRA already published "
                        "is rewritten with the same values)", output_dir)
        else:
            trainer.load_resume_state(latest)
            if main:
                log.info("resumed from %s at step %d", latest, trainer.progress.step)

    if main:
        log.info(_startup_summary(job, family.name, accelerator, len(samples), setup.encoded, setup.buckets,
                                  setup.items, setup.num_trainable, setup.batches_per_epoch, validation))
    accelerator.init_trackers("tailoredgen-train", config=_flat_hparams(job))
    trained = accelerator.unwrap_model(trainer.denoiser)
    try:
        history = trainer.train()
    except Preempted:
        _shut_down(accelerator, trainer, every_process_agrees=True)
        raise
    except BaseException:
        _shut_down(accelerator, trainer, every_process_agrees=False)
        raise
    _shut_down(accelerator, trainer, every_process_agrees=True)
    checkpoints = [checkpointer.path_for(s) for s in params.checkpoint_steps() if checkpointer.path_for(s).is_dir()]
    if main:
        log.info(_finish_summary(checkpoints, trainer.progress.step, params.total_training_steps))
    return TrainingResult(output_dir=output_dir, checkpoints=checkpoints, history=history,
                          final_step=trainer.progress.step, denoiser=trained)


def _stop_if_requested(stop_flag: StopFlag, accelerator: Accelerator | None, when: str) -> None:
    """A stop that came before the loop (the stop file, a signal while loading) ends the run now, not
    after the next expensive phase; with an accelerator every process takes the same branch."""
    requested = stop_flag.requested is not None
    if accelerator is not None:
        requested = any_process(accelerator, requested)
    if requested:
        raise Preempted(f"stopped {when}: a stop was requested (a signal, or the file {stop_flag.stop_file}; "
                        "delete that file to run the job again)", stop_flag.requested or 15)


def _shut_down(accelerator: Accelerator, trainer: Trainer, *, every_process_agrees: bool) -> None:
    """Free the DDP wrapper, then the process group, while every process is still there: a gloo
    group torn down by the wrapper's destructor after a peer exited can hang its process."""
    trainer.denoiser = accelerator.unwrap_model(trainer.denoiser)
    set_lora_input_casting(trainer.denoiser, True)  # callers may run it outside autocast
    if trainer.validator is not None:
        trainer.validator.release()
    accelerator.free_memory()  # drops accelerate's references to the wrapper and its reducer
    gc.collect()
    if every_process_agrees:
        accelerator.wait_for_everyone()
    accelerator.end_training()


def _flat_hparams(job: JobSpec) -> dict[str, Any]:
    flat = {f"params/{k}": v for k, v in job.params.to_dict().items() if v is not None}
    flat.update({"training_version": canonical_version(job.training_version), "base": job.base})
    return flat


def _startup_summary(job, family_name, accelerator, num_samples, encoded, buckets, items, num_trainable,
                     batches_per_epoch, validation: ValidationPlan | None) -> str:
    params, config = job.params, job.engine
    used = sorted({item.bucket for item in items})
    accumulation = config.accumulation_steps(accelerator.num_processes)
    lines = [
        f"tailoredgen-train {__version__}: training_version={job.training_version} (family {family_name})",
        "resolved training_parameters: " + json.dumps(params.to_dict()),
        f"checkpoint steps: {params.checkpoint_steps()}",
        f"base: {job.base}",
        f"dataset: {job.dataset_dir} ({num_samples} images; {encoded} encoded by this process, rest cached)",
        f"buckets used: {', '.join(f'{w}x{h}' for w, h in used)} (of {len(buckets)} at resolution {config.data.resolution})",
        f"processes: {accelerator.num_processes} on {accelerator.device.type}, precision {accelerator.mixed_precision}",
        f"global batch: {config.optim.global_batch_size} = {config.data.batch_size} x {accumulation} "
        f"accumulation x {accelerator.num_processes} processes; {batches_per_epoch} micro-batches per epoch",
        f"LoRA: rank {params.rank}, alpha {params.rank}, {num_trainable:,} trainable parameters",
        f"validation: {_validation_summary(validation)}",
        f"output: {job.output_dir}",
    ]
    return "\n".join(lines)


def _validation_summary(plan: ValidationPlan | None) -> str:
    if plan is None:
        return "off (validation.enabled=false)"
    when = ["before step 1"] if plan.at_start else []
    when.append("at every checkpoint")
    if plan.every:
        when.append(f"every {plan.every} steps")
    return f"{len(plan.prompts)} prompt(s), {', '.join(when)}"


def _finish_summary(checkpoints: list[Path], step: int, total_steps: int) -> str:
    done = "done." if step >= total_steps else f"stopped early at step {step} of {total_steps}."
    lines = [f"{done} LoRA files:" if checkpoints else f"{done} No LoRA file published."]
    lines += [f"  {path / 'pytorch_lora_weights.safetensors'}" for path in checkpoints]
    return "\n".join(lines)

