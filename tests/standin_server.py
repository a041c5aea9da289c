"""`serve` with tests/standin_job.py for jobs, in a process of its own, for the kill -9 test: the
real app, runner and local backend, with processes that follow the job's protocol in a moment.

    python tests/standin_server.py TMP_DIR BASE PORT

The settings are service_helpers.settings_for(TMP_DIR, BASE) with lost_jobs=fail and room for many
trainings, so that a test's in-process server on the same TMP_DIR/data has the same ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

import uvicorn

from service_helpers import StandInBackend, settings_for
from tailoredgen_train.service.app import create_app

CRASH_SETTINGS = {"lost_jobs": "fail", "max_concurrent_trainings": 64}

if __name__ == "__main__":
    tmp, base, port = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    app = create_app(settings_for(tmp, base, **CRASH_SETTINGS), StandInBackend())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
