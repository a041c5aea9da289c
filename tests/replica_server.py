"""One service replica in its own process (so that a test can SIGKILL it): the real app and the real
local backend under uvicorn, with a stand-in job that ends when the test releases it.

    python tests/replica_server.py DATA_DIR DB_URL PORT BASE_DIR

The stand-in job waits for RUN_DIR/release, then writes a `completed` outcome (final step 100) as
the engine does; SIGTERM (stop_training) ends it without one, as a stopped job.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from service_helpers import SleepingBackend, settings_for
from tailoredgen_train.service.app import create_app

RELEASE_FILE = "release"
STAND_IN = """
import sys, time
from pathlib import Path
from tailoredgen_train.outcome import write_outcome
run_dir = Path(sys.argv[1]).parent
deadline = time.monotonic() + 120  # a test that failed before releasing it leaves no process behind
while not (run_dir / "release").exists():
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
write_outcome(run_dir, "completed", final_step=100)
"""


class ReleasedBackend(SleepingBackend):
    def __init__(self):
        super().__init__()
        self._launcher.command = lambda job_file, port=None: [sys.executable, "-c", STAND_IN, str(job_file)]


def main() -> None:
    data_dir, db_url, port, base = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own = data_dir.parent / f"replica-{port}"  # its engine.yaml: replicas starting together write none twice
    own.mkdir()
    settings = settings_for(own, base, data_dir=data_dir, db_url=db_url)
    uvicorn.run(create_app(settings, ReleasedBackend()), host="127.0.0.1", port=port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
