"""Command line of tailoredgen-train: caption, validate and train a dataset, generate, report, serve.

Commands: train, validate-dataset, caption, visual-schema, expand-prompt, generate, report,
make-tiny-base, run-job (internal), serve, db upgrade.

The train flags named after the contract's request fields go through the same resolution as the
API (expert-mode rule, ranges, defaults); engineering options come from --config and --set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .captioning import commands as caption_commands
from .inference import commands as generate_commands
from .config import EngineConfig, load_engine_config
from .contract import REQUEST_FIELDS, TRAINING_MODES, resolve_training_parameters
from .errors import (
    BaseModelError,
    ConfigError,
    DatasetInvalidError,
    NotARunFolderError,
    OutputDirError,
    Preempted,
    TailoredGenError,
    did_you_mean,
)
from .service.settings import TOKENS_ENV

EXIT_USER_ERROR = 2  # the input is wrong: fix it and run again
EXIT_FAILURE = 1
# a run stopped by SIGTERM / SIGINT exits 143 / 130 after saving resume state

# The service answers these with 500 (the operator's config, base or disk, not the API client's
# request); typed on the command line they are the user's input, so exit 2 like any bad input.
# run-job stays the exception: its input is a job file that the service wrote.
_OPERATOR_INPUT_ERRORS = (ConfigError, BaseModelError, OutputDirError)

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that names the closest option to a typo."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # each (sub)command parser refuses its own leftovers, so it can suggest its options
            options = [o for action in self._actions for o in action.option_strings]
            flags = [e.split("=", 1)[0] for e in extras if e.startswith("-")]
            hint = did_you_mean(flags[0], options) if flags else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="engine config YAML (see configs/); defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one engine config value, e.g. --set data.resolution=512 (repeatable)")
    parser.add_argument("--version-map", help="YAML mapping training_version -> family (default: packaged map)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tailoredgen-train", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a LoRA (works under `accelerate launch`)")
    # --base, --dataset and --training-version are required for a fresh run; --resume reads them from OUTPUT/job.json
    train.add_argument("--base", help="diffusers-format base model directory or hub id")
    train.add_argument("--dataset", help="folder of images + metadata.jsonl (or metadata.csv)")
    train.add_argument("--output", required=True, help="run folder: checkpoints, logs, cache")
    train.add_argument("--training-version", help="fibo, max, light, 3.2 (bria-3.2), 2.3 (bria-2.3)")
    train.add_argument("--training-mode", choices=TRAINING_MODES,
                       help="the contract's fields below need expert (default fully_automated)")
    train.add_argument("--caption-prefix", help="legacy datasets: text prepended to every caption")
    train.add_argument("--rank", type=int)
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--lr-scheduler")
    train.add_argument("--total-training-steps", type=int)
    train.add_argument("--checkpoint-interval", type=int)
    train.add_argument("--lr-warmup-steps", type=int)
    train.add_argument("--resume", action="store_true",
                       help="continue the run saved in --output from its newest valid checkpoint; needs no other "
                       "flag, and a flag that differs from the saved job is refused (see run.allow_changed_on_resume)")
    train.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --output")
    _add_engine_options(train)

    validate = commands.add_parser("validate-dataset", help="decode every image and check every caption")
    validate.add_argument("dataset", help="dataset folder")
    validate.add_argument("--training-version", required=True)
    validate.add_argument("--caption-prefix")
    validate.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_engine_options(validate)

    generate_commands.add_commands(commands)

    tiny = commands.add_parser("make-tiny-base", help="build a tiny base model with the real classes")
    tiny.add_argument("--family", required=True, help="model family, e.g. fibo; fibo-vlm: a tiny captioning VLM")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)

    serve = commands.add_parser("serve", help="run the Tailored Generation HTTP service (FastAPI + uvicorn) and its "
                                              "web console (/console)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default="tailoredgen-data", help="SQLite database, datasets and run folders")
    serve.add_argument("--db", help="database URL (default: SQLite in --data-dir); postgresql://USER@HOST/DB "
                       "serves several replicas sharing one --data-dir")
    serve.add_argument("--no-migrate", dest="migrate", action="store_false",
                       help="do not migrate the database at start-up (refuse to start unless `db upgrade` did)")
    serve.add_argument("--base", action="append", default=[], metavar="FAMILY=PATH_OR_ID",
                       help="base model of a family, e.g. --base fibo=runs/tiny-fibo-base (repeatable)")
    serve.add_argument("--engine-config", action="append", default=[], metavar="FAMILY=YAML",
                       help="engine config of a family, e.g. --engine-config fibo=configs/fibo.yaml (repeatable)")
    serve.add_argument("--tokens-file", help=f"API tokens, one per line, each optionally followed by its organization "
                       f"(`TOKEN ORG`; tokens of one organization share its data, a token without one is an "
                       f"organization of its own); also read from {TOKENS_ENV}")
    serve.add_argument("--launcher", choices=("local", "slurm"), default="local")
    serve.add_argument("--slurm-template", help="sbatch template (default: the packaged train.sbatch)")
    serve.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) per training job; per node "
                       "with --launcher slurm")
    serve.add_argument("--slurm-nodes", type=int, default=1, help="nodes per training job with --launcher slurm")
    serve.add_argument("--gpus", help="GPU ids the local launcher hands out, comma-separated, --num-processes to a "
                                      "job; jobs queue while none is free (default: CUDA_VISIBLE_DEVICES, else "
                                      "every GPU)")
    serve.add_argument("--lost-jobs", choices=("resume", "fail"), default="resume",
                       help="a job found gone without a result (e.g. after a restart): resume it or mark it Failed")
    serve.add_argument("--keep-finished-runs", action="store_true",
                       help="keep a finished job's feature cache and every resume state (default: delete them; "
                            "published checkpoints are always kept)")
    serve.add_argument("--rate-limit", type=int, default=600, help="requests per minute per token")
    serve.add_argument("--max-concurrent-trainings", type=int, default=4, help="per token")
    serve.add_argument("--poll-interval", type=float, default=2.0, help="seconds between job checks")
    serve.add_argument("--public-url", help="base of download links (default: the request's own)")
    serve.add_argument("--version-map", help="YAML mapping training_version -> family (default: packaged map)")
    serve.add_argument("--generation-resolution", action="append", default=[], metavar="FAMILY=PX",
                       help="image side the generation endpoints render for a family (default 1024; e.g. "
                       "fibo=128 for a CPU demo) (repeatable)")
    serve.add_argument("--import-root", action="append", default=[], metavar="DIR",
                       help="a folder whose files bulk-upload's zip_url and upload_model's model_url may name by "
                       "server path (repeatable; default none: only http(s) URLs)")
    serve.add_argument("--vlm", help="captioning model, a hub id (briaai/FIBO-vlm) or a Qwen3-VL folder: automatic "
                       "captions, visual schemas, caption prefixes, refined and plain-text FIBO prompts (loaded on "
                       "first use; CUDA bf16 when available)")
    serve.add_argument("--vlm-string-tokens", type=int, help="one token allowance for every caption string "
                       "(shorter captions; CPU demos)")
    serve.add_argument("--vlm-max-pixels", type=int, help="largest image area given to the VLM (default FIBO's "
                       "1024*28*28)")
    serve.add_argument("--max-upload-mb", type=int, default=50, help="largest image upload, in MiB (413 beyond, "
                       "refused from the Content-Length or as soon as the streamed body passes it)")
    serve.add_argument("--max-json-kb", type=int, default=1024, help="largest JSON or form body, in KiB (413 beyond)")
    serve.add_argument("--max-image-pixels", type=int, default=50_000_000,
                       help="largest uploaded image, in pixels, checked from its header before decoding (413 beyond)")
    serve.add_argument("--max-concurrent-decodes", type=int, default=2,
                       help="uploaded images decoded at once; the others wait (bounds the memory uploads take)")

    db = commands.add_parser("db", help="the service's database: `db upgrade` migrates it to this version")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to this version's schema (serve does "
                                                     "it at start-up unless --no-migrate)")
    upgrade.add_argument("--data-dir", default="tailoredgen-data", help="where serve's SQLite database is")
    upgrade.add_argument("--db", help="database URL (default: SQLite in --data-dir)")
    revision = db_commands.add_parser("revision", help="(developers) write a migration for what the models in "
                                                       "service/db.py have that the newest one lacks")
    revision.add_argument("-m", "--message", required=True, help="what changes, e.g. 'add models.foo'")

    job = commands.add_parser("run-job", help="run a job.json written by start_training (internal)")
    job.add_argument("job_file")

    report = commands.add_parser("report", help="rebuild RUN_DIR/report.html (status, curves, samples, settings)")
    report.add_argument("run_dir", help="a run's output folder (the one holding job.json)")

    caption_commands.add_commands(commands)
    return parser


def _family(training_version: str, engine: EngineConfig, version_map: str | None, config: str | None):
    """The family of --training-version, refusing a --config written for another family."""
    from .families import family_for_config, load_version_map

    return family_for_config(training_version, engine, load_version_map(version_map), source=f"--config {config}")


def _cmd_train(args: argparse.Namespace) -> int:
    from .recipe import run_training
    from .saved_job import job_for_resume

    request = {name: getattr(args, name) for name in REQUEST_FIELDS if getattr(args, name) is not None}
    job = None
    if args.resume:  # the saved job, the flags given checked against it; None when the folder saved none
        job = job_for_resume(args.output, base=args.base, dataset=args.dataset, training_version=args.training_version,
                             training_mode=args.training_mode, caption_prefix=args.caption_prefix,
                             version_map=args.version_map, request=request, config=args.config,
                             overrides=args.overrides, overwrite=args.overwrite)
    if job is None:
        missing = [flag for flag in ("--base", "--dataset", "--training-version")
                   if getattr(args, flag[2:].replace("-", "_")) is None]
        if missing:
            where = f"; --resume found no saved job in {args.output}" if args.resume else ""
            print(f"tailoredgen-train train: error: the following arguments are required: {', '.join(missing)}{where}; "
                  "see tailoredgen-train train --help", file=sys.stderr)
            return EXIT_USER_ERROR
        job = _fresh_job(args, request)
    # the checks that name a flag, in the order run_training makes them, before it loads anything
    family = _family(job.training_version, job.engine, job.version_map, args.config)
    family.check_base(job.base)
    family.check_caption_prefix(job.caption_prefix)
    dataset = Path(job.dataset_dir)
    if not dataset.is_dir():
        problem = "is not a folder" if dataset.exists() else "does not exist"
        raise DatasetInvalidError(f"--dataset {job.dataset_dir} {problem}: pass the folder that holds the images and "
                                  "metadata.jsonl (or metadata.csv)")
    run_training(job)
    return 0


def _fresh_job(args: argparse.Namespace, request: dict):
    from .recipe import JobSpec

    params = resolve_training_parameters(args.training_version, args.training_mode or "fully_automated", request)
    if args.lr_warmup_steps and params.lr_warmup_steps is None:
        log.warning("--lr-warmup-steps %d is ignored: warmup applies only with --lr-scheduler constant_with_warmup "
                    "and this run uses %s (lr_warmup_steps is reported as null). Drop the flag, or choose "
                    "constant_with_warmup.", args.lr_warmup_steps, params.lr_scheduler)
    engine = load_engine_config(args.config, args.overrides)
    return JobSpec(
        base=args.base, dataset_dir=args.dataset, output_dir=args.output, training_version=args.training_version,
        params=params, engine=engine, caption_prefix=args.caption_prefix, resume=args.resume,
        overwrite=args.overwrite, version_map=args.version_map,
    )


def _cmd_validate(args: argparse.Namespace) -> int:
    from .data import validate_dataset

    engine = load_engine_config(args.config, args.overrides)
    family = _family(args.training_version, engine, args.version_map, args.config)
    family.check_caption_prefix(args.caption_prefix)  # what train would refuse
    report = validate_dataset(args.dataset, caption_format=family.caption_format, min_side=engine.data.min_side,
                              max_pixels=engine.data.max_pixels, caption_prefix=args.caption_prefix)
    if args.json:
        print(json.dumps({"ok": report.ok, "valid_images": len(report.samples),
                          "problems": [p.to_dict() for p in report.problems],
                          "notes": [n.to_dict() for n in report.notes]}, indent=1))
    else:
        print(report.format())
    return 0 if report.ok else EXIT_USER_ERROR


def _cmd_tiny(args: argparse.Namespace) -> int:
    from .fixtures.tiny_bases import make_tiny_base

    make_tiny_base(args.family, args.out_dir, seed=args.seed)
    print(f"tiny {args.family} base written to {args.out_dir}")
    return 0


def _cmd_run_job(args: argparse.Namespace) -> int:
    """Run a job.json written by start_training; OUTPUT/result.json says how it ended (outcome.py)."""
    from .recipe import JobSpec, run_training

    job = JobSpec.from_dict(json.loads(Path(args.job_file).read_text()))
    run_training(job, output_is_ours=True)  # the service made the folder for this job
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .service.app import serve
    from .service.settings import (ServiceSettings, load_organizations, load_tokens, parse_assignments,
                                   parse_resolutions)

    settings = ServiceSettings(
        data_dir=Path(args.data_dir), db_url=args.db, tokens=load_tokens(args.tokens_file),
        organizations=load_organizations(args.tokens_file),
        bases=parse_assignments(args.base, "--base"), engine_configs=parse_assignments(args.engine_config,
                                                                                       "--engine-config"),
        version_map=args.version_map, launcher=args.launcher, slurm_template=args.slurm_template,
        slurm_nodes=args.slurm_nodes,
        num_processes=args.num_processes, lost_jobs=args.lost_jobs, rate_limit_per_minute=args.rate_limit,
        prune_finished_runs=not args.keep_finished_runs,
        gpus=None if args.gpus is None else [g.strip() for g in args.gpus.split(",") if g.strip()],
        max_concurrent_trainings=args.max_concurrent_trainings, poll_interval_s=args.poll_interval,
        public_url=args.public_url, generation_resolution=parse_resolutions(args.generation_resolution),
        vlm=args.vlm, vlm_string_tokens=args.vlm_string_tokens, vlm_max_pixels=args.vlm_max_pixels,
        import_roots=[Path(root).resolve() for root in args.import_root],
        max_upload_bytes=args.max_upload_mb * 2**20, max_json_bytes=args.max_json_kb * 2**10,
        max_image_pixels=args.max_image_pixels, max_concurrent_decodes=args.max_concurrent_decodes,
        migrate=args.migrate,
    )
    serve(settings, args.host, args.port)
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from .service import migrations

    if args.db_command == "revision":
        print(f"wrote {migrations.new_revision(args.message)}: read it before committing")
        return 0
    from .service.db import Database

    if not args.db:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    database = Database(args.db or f"sqlite:///{Path(args.data_dir) / 'tailoredgen.sqlite3'}")  # migrates it
    database.dispose()
    before, now = database.revisions
    name = database.engine.url.render_as_string(hide_password=True)
    print(f"database {name}: at revision {now}" if before == now else
          f"database {name}: upgraded from revision {before or 'none (empty)'} to {now}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report
    from .report.metrics import JOB_FILE

    run_dir = Path(args.run_dir)
    if not (run_dir / JOB_FILE).is_file():
        raise NotARunFolderError(f"{run_dir} is not a run folder: it has no {JOB_FILE} (a run writes one when its "
                                 "training starts). Pass the --output folder of a run.")
    print(build_report(run_dir))
    return 0


COMMANDS = {"train": _cmd_train, "validate-dataset": _cmd_validate, **generate_commands.COMMANDS,
            "report": _cmd_report, "make-tiny-base": _cmd_tiny, "run-job": _cmd_run_job, "serve": _cmd_serve,
            "db": _cmd_db,
            **caption_commands.COMMANDS}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except Preempted as exc:
        print(f"stopped [{exc.code}]: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except TailoredGenError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        user_input = exc.http_status < 500 or (isinstance(exc, _OPERATOR_INPUT_ERRORS) and args.command != "run-job")
        return EXIT_USER_ERROR if user_input else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
