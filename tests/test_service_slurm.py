"""The Slurm launcher: the packaged sbatch template, submitted with `sbatch`, watched with `squeue`,
stopped with `scancel`. This machine has no Slurm, so stand-in sbatch/squeue/scancel scripts run
the rendered batch script as a local process; the script itself, and the training in it, are real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from service_helpers import (ThreadServer, client, completed_fibo_dataset, create_model, settings_for,
                             wait_for_status)
from tailoredgen_train.contract import TrainingParameters
from tailoredgen_train.recipe import JobSpec
from tailoredgen_train.service.launchers import DEFAULT_SLURM_TEMPLATE, SlurmBackend

pytestmark = pytest.mark.slow

FAKE_SBATCH = """#!/bin/bash
# sbatch --parsable SCRIPT: run SCRIPT in its own session, print a job id
script="${@: -1}"
id=$(( $(ls "$FAKE_SLURM" | wc -l) + 1000 ))
setsid bash "$script" >> "$FAKE_SLURM/$id.out" 2>&1 < /dev/null &
echo $! > "$FAKE_SLURM/$id.pid"
echo "$id"
"""
FAKE_SQUEUE = """#!/bin/bash
# squeue --noheader --jobs ID --format %T
while [ $# -gt 0 ]; do [ "$1" = "--jobs" ] && id="$2"; shift; done
pid=$(cat "$FAKE_SLURM/$id.pid" 2>/dev/null) || { echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1; }
if kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != "Z" ]; then echo RUNNING; fi
"""
FAKE_SCANCEL = """#!/bin/bash
# scancel [--signal=TERM --full] ID
signal=KILL
for arg in "$@"; do case "$arg" in --signal=*) signal="${arg#--signal=}";; --*) ;; *) id="$arg";; esac; done
kill -s "$signal" -- "-$(cat "$FAKE_SLURM/$id.pid")"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(state))
    return state


def _job(tmp_path) -> JobSpec:
    from helpers import tiny_engine

    params = TrainingParameters(1e-4, "constant", 4, 10, 10, None)
    return JobSpec(base="/bases/fibo", dataset_dir="/data/d 1", output_dir=str(tmp_path / "run dir"),
                   training_version="fibo", params=params, engine=tiny_engine())


@pytest.mark.parametrize("processes", [1, 4])
def test_the_template_renders_a_valid_batch_script(tmp_path, processes):
    backend = SlurmBackend(num_processes=processes)
    script = backend.render(_job(tmp_path), tmp_path / "run dir" / "job.json")
    assert "${" not in script and f"--gpus-per-task={processes}" in script
    assert f"#SBATCH --output='{tmp_path}/run dir'/train.log" in script
    assert ("--multi_gpu" in script) == (processes > 1)
    path = tmp_path / "train.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert DEFAULT_SLURM_TEMPLATE.read_text().startswith("#!/bin/bash")


def test_a_refused_submission_fails_the_model_with_sbatch_s_reason(tmp_path, fake_slurm, tiny_fibo_base):
    (tmp_path / "bin" / "sbatch").write_text(
        "#!/bin/bash\necho 'sbatch: error: invalid partition name' >&2\nexit 1\n")
    with ThreadServer(settings_for(tmp_path, tiny_fibo_base, launcher="slurm")) as server, client(server.url) as api:
        model_id = create_model(api, completed_fibo_dataset(api))
        assert api.post(f"/models/{model_id}/start_training").status_code == 500
        failed = api.get(f"/models/{model_id}").json()
        assert failed["status"] == "Failed" and "invalid partition name" in failed["error"]["message"]


def test_a_job_trains_through_sbatch_and_stops_through_scancel(tmp_path, fake_slurm, tiny_fibo_base):
    settings = settings_for(tmp_path, tiny_fibo_base, launcher="slurm")
    with ThreadServer(settings) as server, client(server.url) as api:
        dataset_id = completed_fibo_dataset(api)
        short = create_model(api, dataset_id)
        assert api.post(f"/models/{short}/start_training", json={"total_training_steps": 10}).status_code == 200
        done = wait_for_status(api, short, {"Completed", "Failed"}, timeout=300)
        assert done["status"] == "Completed", done
        assert done["checkpoint_steps"] == ["10"]
        run_dir = settings.data_dir / "runs" / f"model-{short}"
        assert (run_dir / "train.sbatch").is_file() and (run_dir / "checkpoint-10").is_dir()

        long = create_model(api, dataset_id)
        assert api.post(f"/models/{long}/start_training", json={"total_training_steps": 5000}).status_code == 200
        assert api.post(f"/models/{long}/stop_training").json()["status"] == "Stopping"
        assert wait_for_status(api, long, {"Stopped"}, timeout=300)["status"] == "Stopped"
