"""The Slurm launcher: the packaged sbatch template, submitted with `sbatch`, watched with `squeue`,
stopped with `scancel`. This machine has no Slurm, so stand-in sbatch/squeue/scancel/srun/scontrol
scripts run the rendered batch script as a local process (srun: one task per emulated node); the
script itself, and the training in it, are real. Several nodes are checked with a stand-in python
on each node that records its launch command and rendezvous variables and waits for SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from service_helpers import (ThreadServer, client, completed_fibo_dataset, create_model, settings_for,
                             wait_for_status)
from tailoredgen_train.contract import TrainingParameters
from tailoredgen_train.engine.preemption import StopFlag
from tailoredgen_train.recipe import JobSpec
from tailoredgen_train.service.launchers import DEFAULT_SLURM_TEMPLATE, SlurmBackend

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

FAKE_SBATCH = """#!/bin/bash
# sbatch --parsable SCRIPT: run SCRIPT in its own session on a one-node allocation, print a job id
script="${@: -1}"
id=$(( $(ls "$FAKE_SLURM" | wc -l) + 1000 ))
SLURM_JOB_ID=$id SLURM_JOB_NODELIST=localhost SLURM_NNODES=1 setsid bash "$script" >> "$FAKE_SLURM/$id.out" 2>&1 \
    < /dev/null &
echo $! > "$FAKE_SLURM/$id.pid"
echo "$id"
"""
FAKE_SRUN = """#!/bin/bash
# srun --nodes=N [options] COMMAND...: COMMAND once per node, each with its node's Slurm variables;
# a signal to srun is forwarded to every node's task, as srun forwards it to the job step's tasks
nodes=1
while [ $# -gt 0 ]; do case "$1" in --nodes=*) nodes="${1#--nodes=}";; --*) ;; *) break;; esac; shift; done
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURMD_NODENAME=node$node "$@" &
    pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
    while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done
    [ "$code" != 0 ] && status=$code
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST: one host a line (the tests' lists are plain: node0,node1)
tr ',' '\\n' <<< "$3"
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
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("scancel", FAKE_SCANCEL),
                       ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
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


@pytest.mark.parametrize("nodes, processes", [(1, 1), (1, 4), (2, 4)])
def test_the_template_renders_a_valid_batch_script(tmp_path, nodes, processes):
    backend = SlurmBackend(num_processes=processes, num_nodes=nodes)
    script = backend.render(_job(tmp_path), tmp_path / "run dir" / "job.json")
    assert "${" not in script.replace("${step:-}", "")
    assert f"#SBATCH --nodes={nodes}\n" in script and f"#SBATCH --gpus-per-node={processes}\n" in script
    assert f"if [ {nodes * processes} -gt 1 ]" in script
    assert f"#SBATCH --output='{tmp_path}/run dir'/train.log" in script
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


# ---- several nodes -------------------------------------------------------------------------------

FAKE_NODE_PYTHON = """#!/bin/bash
# stands in for python on node $SLURM_NODEID: records the node's launch command and rendezvous
# variables, then runs like a rank until SIGTERM (recorded, exit 143), or exits $FAKE_NODE_EXIT at once
out="$FAKE_SLURM/node-$SLURM_NODEID"
trap 'echo TERM > "$out.signal"; exit 143' TERM
printf '%s\\n' "$@" > "$out.argv"
env | grep -E '^(MAIN_PROCESS_|SLURM_NODEID|TORCH_ELASTIC_)' | sort > "$out.env"
[ -n "${FAKE_NODE_EXIT:-}" ] && exit "$FAKE_NODE_EXIT"
touch "$out.started"
while :; do sleep 0.05; done
"""


def _render(tmp_path, *, nodes: int, processes: int) -> tuple[Path, Path]:
    """The packaged template for `nodes` x `processes`, with python standing in on every node."""
    python = tmp_path / "bin" / "python-on-node"
    python.write_text(FAKE_NODE_PYTHON)
    python.chmod(0o755)
    job_file = tmp_path / "run dir" / "job.json"
    script = tmp_path / "train.sbatch"
    script.write_text(SlurmBackend(num_processes=processes, num_nodes=nodes, python=str(python))
                      .render(_job(tmp_path), job_file))
    return script, job_file


def _run_batch(script: Path, fake_slurm: Path, *, nodes: int, job_id: int, stop: bool, **env: str) -> int:
    """Run a batch script with bash as sbatch would on the allocation node0..node<N-1>; with `stop`,
    SIGTERM the batch script alone once every node runs."""
    for old in fake_slurm.glob("node-*"):
        old.unlink()
    env = {**os.environ, "SLURM_JOB_ID": str(job_id), "SLURM_NNODES": str(nodes),
           "SLURM_JOB_NODELIST": ",".join(f"node{n}" for n in range(nodes)), **env}
    if not stop:
        env["FAKE_NODE_EXIT"] = "0"
    batch = subprocess.Popen(["bash", str(script)], env=env, start_new_session=True)
    try:
        if stop:
            deadline = time.monotonic() + 30
            while len(list(fake_slurm.glob("node-*.started"))) < nodes and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not list(fake_slurm.glob("node-*.signal"))  # no rank stops before the signal
            batch.send_signal(signal.SIGTERM)  # the batch script only, as --signal=B:TERM sends it
        return batch.wait(timeout=30)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)


def _node_launch(fake_slurm: Path, node: int) -> tuple[list[str], dict[str, str]]:
    argv = (fake_slurm / f"node-{node}.argv").read_text().splitlines()
    env = dict(line.split("=", 1) for line in (fake_slurm / f"node-{node}.env").read_text().splitlines())
    return argv, env


def test_two_nodes_each_launch_accelerate_with_the_rendezvous_and_a_sigterm_reaches_every_rank(tmp_path,
                                                                                               fake_slurm):
    script, job_file = _render(tmp_path, nodes=2, processes=4)
    assert _run_batch(script, fake_slurm, nodes=2, job_id=4242, stop=True) == 143  # stopped after saving: resume later
    for node in (0, 1):
        argv, env = _node_launch(fake_slurm, node)
        options = dict(zip(argv[3:-4:2], argv[4:-4:2]))
        assert argv[:3] == ["-m", "accelerate.commands.launch", "--multi_gpu"], argv
        assert options == {"--num_machines": "2", "--machine_rank": str(node), "--num_processes": "8",
                           "--main_process_ip": "node0", "--main_process_port": str(15000 + 4242)}, argv
        assert argv[-4:] == ["-m", "tailoredgen_train", "run-job", str(job_file)]
        assert env["MAIN_PROCESS_IP"] == "node0" and env["SLURM_NODEID"] == str(node)
        assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < 120  # the ranks save within --signal's 120 s
        assert (fake_slurm / f"node-{node}.signal").read_text().strip() == "TERM"


def test_the_port_comes_from_the_job_id_and_a_finished_job_exits_with_its_status(tmp_path, fake_slurm):
    ports = []
    script, _ = _render(tmp_path, nodes=2, processes=1)
    for job_id in (4242, 4243):  # two jobs that share a node
        assert _run_batch(script, fake_slurm, nodes=2, job_id=job_id, stop=False) == 0
        assert not list(fake_slurm.glob("node-*.signal"))
        argv, env = _node_launch(fake_slurm, 1)
        assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--machine_rank") + 1] == "1"
        ports.append(env["MAIN_PROCESS_PORT"])
    assert ports == ["19242", "19243"]


def test_one_process_runs_the_engine_without_a_launcher(tmp_path, fake_slurm):
    script, job_file = _render(tmp_path, nodes=1, processes=1)
    assert _run_batch(script, fake_slurm, nodes=1, job_id=7, stop=False) == 0
    assert _node_launch(fake_slurm, 0)[0] == ["-m", "tailoredgen_train", "run-job", str(job_file)]


def test_the_standalone_script_trains_on_two_nodes_and_continues_with_resume(tmp_path, fake_slurm):
    _render(tmp_path, nodes=1, processes=1)  # writes the python stand-in
    script, output = REPO / "scripts" / "slurm" / "train.sbatch", tmp_path / "out"
    env = dict(PYTHON=str(tmp_path / "bin" / "python-on-node"), OUTPUT=str(output), SLURM_GPUS_ON_NODE="2")
    assert _run_batch(script, fake_slurm, nodes=2, job_id=11, stop=True, **env) == 143
    for node in (0, 1):
        argv, _ = _node_launch(fake_slurm, node)
        train = argv[argv.index("tailoredgen_train") + 1:]
        assert argv[argv.index("--machine_rank") + 1] == str(node) and argv[argv.index("--num_processes") + 1] == "4"
        assert argv[argv.index("--main_process_port") + 1] == "15011" and (fake_slurm / f"node-{node}.signal").exists()
        assert train[0] == "train" and "--resume" not in train and train[-2:] == ["--output", str(output)]
    # the run saved its job: resubmitting continues it with the same flags and --resume
    output.mkdir()
    (output / "job.json").write_text("{}")
    assert _run_batch(script, fake_slurm, nodes=2, job_id=12, stop=False, **env) == 0
    train = _node_launch(fake_slurm, 0)[0]
    assert train[-3:] == ["--resume", "--output", str(output)]


def test_a_repeated_sigterm_does_not_cut_the_save_short():
    """Slurm signals every process of a step and accelerate's launcher forwards the signal again: the
    second SIGTERM must leave the pending stop alone (a second Ctrl-C still ends the process)."""
    flag = StopFlag()
    flag.handle(signal.SIGTERM)
    flag.handle(signal.SIGTERM)  # the default action here would end this test process
    assert flag.requested == signal.SIGTERM
