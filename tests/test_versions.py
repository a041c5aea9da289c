"""Every training_version the contract names trains through the same CLI, with its own defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tailoredgen_train.cli import main
from tailoredgen_train.contract import canonical_version, defaults_for
from tailoredgen_train.data import SAMPLE_DATASET_DIR, SAMPLE_TEXT_CAPTION_PREFIX, SAMPLE_TEXT_DATASET_DIR
from tailoredgen_train.engine.checkpoint import Checkpointer
from tailoredgen_train.families import load_version_map

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["fibo", "max", "light", "3.2", "2.3", "bria-3.2", "bria-2.3"])
def test_each_version_runs_a_short_job_with_its_defaults(version, caplog, tiny_fibo_base, legacy_bases, tmp_path):
    family = load_version_map()[canonical_version(version)]
    base = tiny_fibo_base if family == "fibo" else legacy_bases[family]
    data = (["--dataset", str(SAMPLE_DATASET_DIR)] if family == "fibo" else
            ["--dataset", str(SAMPLE_TEXT_DATASET_DIR), "--caption-prefix", SAMPLE_TEXT_CAPTION_PREFIX])
    caplog.set_level("INFO", logger="tailoredgen_train")
    code = main(["train", "--base", str(base), *data, "--output", str(tmp_path / "out"), "--training-version", version,
                 "--config", str(REPO / "configs" / f"{family}-tiny.yaml"), "--set", "run.log_with=none",
                 "--set", "run.stop_after_steps=2",  # the defaults' 750/1500 steps, cut short
                 "--set", "validation.enabled=false"])  # renders are tested in test_validation.py
    out = caplog.text  # the startup summary is a log line (the console's and train.log's)
    assert code == 0

    expected = defaults_for(version)
    if expected["lr_scheduler"] != "constant_with_warmup":
        expected["lr_warmup_steps"] = None
    resolved = json.loads(out.split("resolved training_parameters: ", 1)[1].splitlines()[0])
    assert resolved == expected
    assert f"(family {family})" in out
    checkpointer = Checkpointer(tmp_path / "out")
    assert checkpointer.resume_steps() == [2] and checkpointer.published_steps() == []
    assert json.loads((tmp_path / "out" / "job.json").read_text())["training_version"] == version
