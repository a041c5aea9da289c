"""A stand-in for `run-job` in the service's job tests: it follows the job's stop protocol with the
engine's own parts (StopFlag: SIGTERM, or OUTPUT/stop-requested checked at start-up and at each
step boundary; result.json through outcome.write_outcome) but loads no model, so that a test can
start a hundred of them. It records what it was given (environment, argv) in OUTPUT/env.json.

    python tests/standin_job.py JOB_JSON STEPS STEP_SECONDS [--port PORT]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tailoredgen_train.engine.preemption import STOP_FILE, StopFlag
from tailoredgen_train.outcome import write_outcome

RECORDED = ("CUDA_VISIBLE_DEVICES", "TAILOREDGEN_LAUNCH_TOKEN")


def main(job_file: str, steps: int, step_seconds: float, port: str | None) -> int:
    output = Path(json.loads(Path(job_file).read_text())["output_dir"])
    stop_flag = StopFlag(output / STOP_FILE).install()
    record = {"env": {k: os.environ.get(k) for k in RECORDED}, "port": port, "pid": os.getpid(), "at": time.time()}
    staging = output / f".env.json.tmp-{os.getpid()}"
    staging.write_text(json.dumps(record))
    os.replace(staging, output / "env.json")
    for step in range(steps + 1):  # step 0: the start-up check
        if stop_flag.requested is not None:
            write_outcome(output, "preempted", code="preempted", message=f"stopped at step {step}")
            return 128 + stop_flag.requested
        time.sleep(step_seconds)
    write_outcome(output, "completed", final_step=steps)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    port = args[args.index("--port") + 1] if "--port" in args else None
    sys.exit(main(args[0], int(args[1]), float(args[2]), port))
