"""start_training: the documented precondition order, the 200 body, and a job that really trains."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import subset_dataset, tiny_engine
from tailoredgen_train.contract import DatasetRecord, ModelRecord
from tailoredgen_train.errors import (
    DatasetNotCompletedError,
    ExpertModeRequiredError,
    IncompatibleDatasetError,
    InvalidParameterError,
    TrainingAlreadyStartedError,
    UnknownTrainingVersionError,
)
from tailoredgen_train.start import InProcessLauncher, SubprocessLauncher, start_training


class RecordingLauncher:
    def __init__(self):
        self.jobs = []

    def launch(self, job):
        self.jobs.append(job)


def records(tmp_path, *, mode="expert", model_status="Created", dataset_status="completed",
            model_version="fibo", dataset_version="fibo", prefix=None):
    model = ModelRecord(id=7, name="mascot", dataset_id=3, project_id=1, training_version=model_version,
                        training_mode=mode, description="our mascot")
    model.status = model_status
    dataset = DatasetRecord(id=3, project_id=1, status=dataset_status, training_version=dataset_version,
                            path=str(tmp_path), caption_prefix=prefix)
    return model, dataset


def test_response_carries_every_contract_field(tmp_path):
    model, dataset = records(tmp_path)
    launcher = RecordingLauncher()
    response = start_training(model, dataset, {"rank": 64}, base="base", output_dir=tmp_path / "out",
                              launcher=launcher).to_dict()
    assert set(response) == {
        "id", "name", "description", "status", "dataset_id", "training_version", "training_mode",
        "generation_prefix", "project_id", "created_at", "updated_at", "custom_metadata", "active_model_version",
        "training_parameters", "checkpoint_steps",
    }
    assert response["status"] == "InProgress" and response["generation_prefix"] is None
    assert response["training_parameters"] == {"learning_rate": 1e-4, "lr_scheduler": "constant_with_warmup",
                                               "rank": 64, "total_training_steps": 750, "checkpoint_interval": 500,
                                               "lr_warmup_steps": 100}
    assert response["checkpoint_steps"] == []
    assert model.status == "InProgress"
    [job] = launcher.jobs
    assert job.params.rank == 64 and job.dataset_dir == str(tmp_path) and job.training_version == "fibo"
    assert job.params.checkpoint_steps() == [500, 750]


def test_second_start_is_a_conflict(tmp_path):
    model, dataset = records(tmp_path)
    start_training(model, dataset, None, base="b", output_dir=tmp_path, launcher=RecordingLauncher())
    with pytest.raises(TrainingAlreadyStartedError) as info:
        start_training(model, dataset, None, base="b", output_dir=tmp_path, launcher=RecordingLauncher())
    assert info.value.http_status == 409


@pytest.mark.parametrize(("kwargs", "request_body", "error"), [
    (dict(model_status="Completed", dataset_status="draft"), None, TrainingAlreadyStartedError),  # 409 before 412
    (dict(dataset_status="draft"), {"rank": 1}, DatasetNotCompletedError),  # 412 before 400
    (dict(dataset_version="max"), None, IncompatibleDatasetError),
    (dict(mode="fully_automated"), {"learning_rate": 1e-4}, ExpertModeRequiredError),
    (dict(), {"total_training_steps": 1_000_000}, InvalidParameterError),
])
def test_preconditions_in_the_documented_order(tmp_path, kwargs, request_body, error):
    model, dataset = records(tmp_path, **kwargs)
    launcher = RecordingLauncher()
    with pytest.raises(error):
        start_training(model, dataset, request_body, base="b", output_dir=tmp_path, launcher=launcher)
    assert launcher.jobs == [] and model.status == kwargs.get("model_status", "Created")


def test_a_legacy_model_carries_the_caption_prefix(tmp_path):
    model, dataset = records(tmp_path, model_version="bria-3.2", dataset_version="max", prefix="a drawing of")
    launcher = RecordingLauncher()
    response = start_training(model, dataset, None, base="b", output_dir=tmp_path, launcher=launcher)
    assert response.generation_prefix == "a drawing of"
    assert response.training_parameters.lr_scheduler == "constant" and response.training_parameters.lr_warmup_steps is None
    [job] = launcher.jobs
    assert job.caption_prefix == "a drawing of" and job.params.total_training_steps == 1500


def test_a_version_mapped_to_a_missing_family_fails_before_launching(tmp_path):
    version_map = tmp_path / "versions.yaml"
    version_map.write_text("versions:\n  fibo: fibo\n  max: bria-4b-adapt\n")
    model, dataset = records(tmp_path, model_version="max", dataset_version="max", prefix="x")
    launcher = RecordingLauncher()
    with pytest.raises(UnknownTrainingVersionError, match="bria-4b-adapt"):
        start_training(model, dataset, None, base="b", output_dir=tmp_path, launcher=launcher,
                       version_map=str(version_map))
    assert launcher.jobs == [] and model.status == "Created"


@pytest.mark.slow
def test_in_process_launch_trains(tiny_fibo_base, tmp_path):
    model, dataset = records(subset_dataset(tmp_path / "data", 2))
    launcher = InProcessLauncher()
    start_training(model, dataset, {"total_training_steps": 100, "checkpoint_interval": 100},
                   base=str(tiny_fibo_base), output_dir=tmp_path / "out", engine=tiny_engine(), launcher=launcher)
    [result] = launcher.results
    assert [p.name for p in result.checkpoints] == ["checkpoint-100"]


@pytest.mark.slow
def test_subprocess_launch_trains(tiny_fibo_base, tmp_path):
    model, dataset = records(subset_dataset(tmp_path / "data", 2))
    launcher = SubprocessLauncher()
    start_training(model, dataset, {"total_training_steps": 1}, base=str(tiny_fibo_base),
                   output_dir=tmp_path / "out", engine=tiny_engine(), launcher=launcher)
    [process] = launcher.processes
    assert process.wait(timeout=300) == 0, (tmp_path / "out" / "train.log").read_text()[-3000:]
    assert (tmp_path / "out" / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "job.json").read_text())["params"]["total_training_steps"] == 1
    assert process.args[:3] == [sys.executable, "-m", "tailoredgen_train"]


def test_subprocess_launcher_commands(tmp_path):
    job_file = tmp_path / "job.json"
    assert SubprocessLauncher().command(job_file) == [sys.executable, "-m", "tailoredgen_train", "run-job",
                                                     str(job_file)]
    several = SubprocessLauncher(num_processes=4).command(job_file)
    assert several[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in several and several[several.index("--num_processes") + 1] == "4"
    assert several[-4:] == ["-m", "tailoredgen_train", "run-job", str(job_file)]
