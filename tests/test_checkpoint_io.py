"""Checkpoint I/O that does not grow with the number of processes: resume files are hashed as they
stream to disk (never read back), kept states are not re-hashed at every save, and a process other
than the main one copies and serialises nothing."""

from __future__ import annotations

from types import SimpleNamespace
from unittest.mock import MagicMock

import torch

import tailoredgen_train.engine.checkpoint as checkpoint_module
import tailoredgen_train.engine.checkpoint_manager as manager_module
from tailoredgen_train.engine.checkpoint import Checkpointer, sha256_file
from tailoredgen_train.engine.checkpoint_manager import CheckpointManager


def files(step: int) -> dict:
    return {"adapter.safetensors": lambda f: f.write(b"lora-%d" % step),
            "optimizer.pt": lambda f: torch.save({"step": torch.tensor(step)}, f),
            "state.json": lambda f: f.write(b"{}")}


def test_resume_states_are_hashed_while_written_and_not_again(tmp_path, monkeypatch):
    reads = []
    monkeypatch.setattr(checkpoint_module, "sha256_file", lambda path: reads.append(path) or sha256_file(path))
    checkpointer = Checkpointer(tmp_path)
    for step in (1, 2, 3, 4):
        checkpointer.save_resume(step, files(step))
    assert reads == []  # no file read back to hash it, before or after a commit
    assert checkpointer.resume_steps() == [4, 3]  # the purge kept the newest two without hashing them
    # the streamed hashes are the files' own: a fresh process verifies them by reading
    assert Checkpointer(tmp_path).latest_resume() == tmp_path / "resume" / "step-4"
    assert len(reads) == 3  # the negative control: verifying reads every file of the state


def test_a_process_other_than_the_main_one_serialises_nothing(tmp_path, monkeypatch):
    copies = []  # host copies of the LoRA
    monkeypatch.setattr(manager_module, "lora_state_dict", lambda model: copies.append(model) or {"w": torch.ones(1)})
    denoiser = torch.nn.Linear(2, 2)
    optimizer = MagicMock()
    checkpointer = MagicMock()
    checkpointer.path_for.return_value = tmp_path / "checkpoint-1"
    checkpointer.resume_path_for.return_value = tmp_path / "resume" / "step-1"
    other = SimpleNamespace(is_main_process=False, num_processes=1, device=torch.device("cpu"),
                            unwrap_model=lambda model: model)
    manager = CheckpointManager(checkpointer, family=MagicMock(), accelerator=other, optimizer=optimizer,
                                lr_scheduler=MagicMock(), identity={})
    progress = SimpleNamespace(step=1, cursor=2, consecutive_nonfinite=0)
    assert manager.save(denoiser, progress) == tmp_path / "checkpoint-1"
    checkpointer.publish.assert_not_called()
    checkpointer.save_resume.assert_not_called()
    optimizer.state_dict.assert_not_called()
    assert copies == []
    # the positive control: the main process does write both
    manager.accelerator = SimpleNamespace(**{**vars(other), "is_main_process": True})
    optimizer.state_dict.return_value = {}
    manager.save(denoiser, progress)
    checkpointer.publish.assert_called_once()
    checkpointer.save_resume.assert_called_once()
    assert copies == [denoiser]  # one host copy, shared by the published LoRA and the resume state
