"""The step's speed levers keep the step's meaning: no mask unless padded (decided on the host),
selective checkpointing, device-side skipping without a per-step host sync, CPU-offloaded AdamW,
and the options' validation. Nothing here times anything."""

from __future__ import annotations

import math
from unittest.mock import MagicMock

import pytest
import torch
from accelerate import Accelerator

from tailoredgen_train.config import load_engine_config
from tailoredgen_train.engine.lora import add_lora
from tailoredgen_train.engine.speed import (
    CpuOffloadAdamW,
    apply_block_policy,
    checkpointed_blocks_for_memory,
    resolve_checkpointing,
    resolve_host_sync,
    skips_on_device,
)
from tailoredgen_train.engine.trainer import Progress, Trainer, TrainerSettings
from tailoredgen_train.errors import ConfigError, NonFiniteLossError
from tailoredgen_train.families.fibo import FiboFamily


def fake_entry(text_len: int, k: int = 3) -> dict[str, torch.Tensor]:
    return {"latents": torch.randn(48, 2, 2), "prompt_embeds": torch.randn(text_len, 64),
            "text_layers": torch.randn(k, text_len, 32)}


def test_collate_adds_a_mask_only_when_a_caption_is_padded():
    family = FiboFamily()
    assert "text_mask" not in family.collate([fake_entry(5), fake_entry(5)])
    padded = family.collate([fake_entry(5), fake_entry(3)])
    assert padded["text_mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert family.attention_kwargs(None, 4, torch.float32) is None
    mask = family.attention_kwargs(padded["text_mask"], 4, torch.float32)["attention_mask"]
    assert mask.shape == (2, 1, 1, 9) and mask[1, 0, 0].tolist() == [True] * 3 + [False] * 2 + [True] * 4


@pytest.mark.parametrize("value", ["sometimes", -1, 1.5])
def test_bad_checkpointing_policy_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match="run.gradient_checkpointing"):
        load_engine_config(None, [f"run.gradient_checkpointing={value}"])


@pytest.mark.parametrize("override, field_name", [("run.host_sync=never", "run.host_sync"),
                                                   ("optim.optimizer=sgd", "optim.optimizer"),
                                                   ("run.compile_blocks=3", "run.compile_blocks")])
def test_bad_speed_options_are_refused_naming_the_field(override, field_name):
    with pytest.raises(ConfigError, match=field_name):
        load_engine_config(None, [override])


def test_checkpointing_policies_resolve():
    cpu = torch.device("cpu")
    kwargs = dict(device=cpu, num_blocks=46, block_bytes=None, trainable_bytes=0, optimizer="adamw")
    assert resolve_checkpointing("auto", **kwargs) is False  # host memory never asks for it
    assert resolve_checkpointing(True, **kwargs) is True
    assert resolve_checkpointing(10, **kwargs) == 10
    assert resolve_checkpointing(46, **kwargs) is True
    # 10 GiB free, 3 GiB reserved, 1 GiB per block: 7 blocks keep their activations
    gib = 2**30
    assert checkpointed_blocks_for_memory(num_blocks=46, block_bytes=gib, reserve_bytes=3 * gib,
                                          free_bytes=10 * gib) == 39
    assert checkpointed_blocks_for_memory(num_blocks=46, block_bytes=gib, reserve_bytes=0, free_bytes=80 * gib) == 0


def _tiny_fibo_step(tiny_fibo_base, checkpointing):
    family = FiboFamily()
    model = family.load(str(tiny_fibo_base), device=torch.device("cpu"), weight_dtype=torch.float32)
    torch.manual_seed(0)
    add_lora(model.denoiser, rank=4, targets=family.default_lora_targets, init="gaussian")
    apply_block_policy(model.denoiser, family.denoiser_blocks(model.denoiser), checkpointing=checkpointing,
                       compile_blocks=False, device=torch.device("cpu"))
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    entry = family.encode_sample(model, pixels, '{"short_description":"a red circle"}')
    loss = family.compute_loss(model.denoiser, family.collate([entry]), torch.Generator().manual_seed(1))
    loss.backward()
    grads = [p.grad.clone() for p in model.denoiser.parameters() if p.requires_grad]
    return float(loss.detach()), grads


def test_checkpointing_a_subset_of_blocks_gives_the_same_loss_and_gradients(tiny_fibo_base):
    loss, grads = _tiny_fibo_step(tiny_fibo_base, False)
    for policy in (2, True):
        loss_ckpt, grads_ckpt = _tiny_fibo_step(tiny_fibo_base, policy)
        assert loss_ckpt == pytest.approx(loss, rel=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_ckpt))


class ScaleFamily:
    def compute_loss(self, denoiser, batch, generator):
        return (denoiser.weight.sum() * batch["scale"]).squeeze()


def deferred_trainer(scales: list[float], *, log_every: int, max_nonfinite: int) -> Trainer:
    denoiser = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=0.1, fused=True)  # CPU fused honours found_inf too
    batches = iter([([0], {"scale": torch.tensor([s])}) for s in scales])
    scheduler = MagicMock()
    scheduler.get_last_lr.return_value = [0.1]
    return Trainer(
        family=ScaleFamily(), denoiser=denoiser, optimizer=optimizer, lr_scheduler=scheduler,
        accelerator=Accelerator(cpu=True), batches_from=lambda cursor: batches, checkpoints=MagicMock(),
        settings=TrainerSettings(total_steps=len(scales), checkpoint_steps=[], gradient_accumulation_steps=1,
                                 max_grad_norm=1.0, seed=0, log_every=log_every, max_consecutive_nonfinite=max_nonfinite,
                                 sync_every_step=False),
        progress=Progress(),
    )


def test_without_a_host_sync_a_non_finite_step_is_skipped_on_the_device():
    assert skips_on_device(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True))
    trainer = deferred_trainer([1.0, float("nan"), 1.0], log_every=10, max_nonfinite=1)
    before = []
    original = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        before.append(trainer.denoiser.weight.detach().clone())
        return original(*args, **kwargs)

    trainer.optimizer.step = recording_step
    history = trainer.train()
    assert [r.skipped for r in history] == [False, True, False]
    assert math.isnan(history[1].loss) and all(math.isfinite(r.loss) for r in (history[0], history[2]))
    assert not torch.equal(before[1], before[0])  # step 1 updated
    assert torch.equal(before[2], before[1])  # the skipped step 2 left the weights as they were
    assert torch.isfinite(trainer.denoiser.weight).all()
    assert trainer.optimizer.state[trainer.denoiser.weight]["step"].item() == 2  # the skipped step is not counted
    assert trainer.progress.consecutive_nonfinite == 0


def test_without_a_host_sync_too_many_non_finite_steps_fail_at_the_next_sync():
    trainer = deferred_trainer([float("nan")] * 4, log_every=2, max_nonfinite=1)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        trainer.train()
    assert trainer.progress.step == 2  # found at the first sync point, not later
    assert torch.isfinite(trainer.denoiser.weight).all()


def test_host_sync_log_needs_an_optimizer_that_skips_on_the_device():
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ConfigError, match="run.host_sync"):
        resolve_host_sync("log", sgd, torch.device("cpu"))
    assert resolve_host_sync("auto", sgd, torch.device("cpu")) is True
    fused = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True)
    assert resolve_host_sync("auto", fused, torch.device("cpu")) is True  # CPU steps are synchronous anyway


def test_cpu_offloaded_adamw_matches_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    reference = torch.optim.AdamW([a], lr=0.01, weight_decay=0.01)
    offloaded = CpuOffloadAdamW([b], lr=0.01, weight_decay=0.01)
    for _ in range(3):
        for param, optimizer in ((a, reference), (b, offloaded)):
            (param * torch.arange(15.0).view(5, 3)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert torch.allclose(a, b, atol=1e-6)
    state = offloaded.state_dict()
    with torch.no_grad():
        b.add_(1.0)  # as a resume would: weights restored first, then the optimizer state
    offloaded.load_state_dict(state)
    assert torch.equal(offloaded.masters[0], b.detach())
