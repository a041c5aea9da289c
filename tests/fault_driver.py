"""Runs one training job (a job.json) in a subprocess with faults injected, for the fault tests.

    python tests/fault_driver.py JOB_JSON [--kill-after-step N] [--kill-at KIND.PHASE:STEP]
                                          [--pause-after-step N] [--drop-scheduler-state]
    python tests/fault_driver.py [flags as above] -- train --output DIR --resume   (any CLI command)

The job runs through the real CLI (`run-job JOB_JSON`, or the command after `--`), so exit codes are the CLI's. Kills are SIGKILL:
nothing in the process gets to clean up, as when a cluster node dies.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from torch.optim.lr_scheduler import LambdaLR

from tailoredgen_train.cli import main
from tailoredgen_train.engine.checkpoint import Storage
from tailoredgen_train.engine.trainer import Trainer


def kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(args: argparse.Namespace) -> None:
    original_step = Trainer.train_step

    def train_step(self, micro_batches):
        record = original_step(self, micro_batches)
        print(f"step {record.step} done", flush=True)
        if record.step == args.pause_after_step:
            # hold the step boundary until a stop signal arrives, so its timing is not a race
            deadline = time.monotonic() + 60
            while self.stop_flag.requested is None and time.monotonic() < deadline:
                time.sleep(0.02)
        if record.step == args.kill_after_step:
            kill_self()  # between steps: after the update, before counters and saves
        return record

    Trainer.train_step = train_step

    if args.kill_at:
        phase, step = args.kill_at.rsplit(":", 1)

        def fault(self, at_phase, at_step):
            if at_phase == phase and at_step == int(step):
                kill_self()

        Storage.fault = fault

    if args.drop_scheduler_state:
        LambdaLR.load_state_dict = lambda self, state: None  # the negative control's missing piece


if __name__ == "__main__":
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1:] if "--" in argv else None
    parser = argparse.ArgumentParser()
    parser.add_argument("job_file", nargs="?" if command else None)
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-at")
    parser.add_argument("--pause-after-step", type=int)
    parser.add_argument("--drop-scheduler-state", action="store_true")
    arguments = parser.parse_args(argv[:argv.index("--")] if command else argv)
    install(arguments)
    sys.exit(main(command or ["run-job", arguments.job_file]))
