"""Text features cached or encoded online train identically; auto picks by the cache's size; the
loader never passes text features through its workers; a finished service run is pruned. And the
step's needless work: PEFT's input cast under autocast, and checkpointing beside compile_blocks."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from diffusers import BriaFiboTransformer2DModel, BriaTransformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile

from helpers import params, subset_dataset, tiny_engine, train
from tailoredgen_train.config import load_engine_config
from tailoredgen_train.data import SAMPLE_DATASET_DIR, SAMPLE_TEXT_DATASET_DIR, validate_dataset
from tailoredgen_train.engine import speed
from tailoredgen_train.engine.cache import CachedFeatures, FeatureCache, TextFeatures, choose_text_features, \
    fill_cache
from tailoredgen_train.engine.checkpoint import Checkpointer
from tailoredgen_train.engine.lora import add_lora, lora_input_casting, set_lora_input_casting
from tailoredgen_train.errors import ConfigError
from tailoredgen_train.families import family_class
from tailoredgen_train.families.fibo import FiboFamily
from tailoredgen_train.service.cleanup import prune_finished_run

CAPTIONS = ['{"short_description":"a red circle on a blue background","style_medium":"digital illustration"}',
            '{"short_description":"a dot"}']


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return subset_dataset(tmp_path_factory.mktemp("data") / "two", 2)


@pytest.fixture(scope="module")
def fibo(tiny_fibo_base):
    family = FiboFamily()
    return family, family.load(str(tiny_fibo_base), device=torch.device("cpu"), weight_dtype=torch.float32)


def run(base, dataset, output, **data):
    return train(base, output, params(1, rank=4), dataset=dataset,
                 engine=tiny_engine(data={"resolution": 64, "min_side": 64, **data}))


def entry_keys(output) -> set[str]:
    keys = set()
    for path in (output / "cache").glob("*.safetensors"):
        keys |= set(load_file(path))
    return keys


def lora(output) -> dict[str, torch.Tensor]:
    return load_file(output / "checkpoint-1" / "pytorch_lora_weights.safetensors")


# ---- the three modes ------------------------------------------------------------------------------

@pytest.mark.slow
def test_cached_and_online_text_features_train_bit_identically_and_auto_goes_online_under_a_small_budget(
        tiny_fibo_base, dataset, tmp_path, caplog, one_thread):
    cached = run(tiny_fibo_base, dataset, tmp_path / "cached", text_features="cache")
    with caplog.at_level(logging.INFO, logger="tailoredgen_train.engine.cache"):
        online = run(tiny_fibo_base, dataset, tmp_path / "auto", text_features="auto", text_cache_budget_gib=1e-6)
    assert "encoding them online" in caplog.text
    assert entry_keys(tmp_path / "cached") == {"latents", "prompt_embeds", "text_layers"}
    assert entry_keys(tmp_path / "auto") == {"latents"}  # only the image features were cached
    # CPU fp32: the same losses and the same LoRA, bit for bit
    assert [r.loss for r in cached.history] == [r.loss for r in online.history]
    ours, theirs = lora(tmp_path / "cached"), lora(tmp_path / "auto")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", ["bria-3.2", "bria-2.3"])  # FIBO: the whole run above
def test_online_batches_equal_cached_ones_and_a_caption_changes_them(name, tiny_fibo_base, legacy_bases, tmp_path,
                                                                     one_thread):
    family = family_class(name)()
    base = tiny_fibo_base if name == "fibo" else legacy_bases[name]
    model = family.load(str(base), device=torch.device("cpu"), weight_dtype=torch.float32)
    source = SAMPLE_DATASET_DIR if family.caption_format == "json" else SAMPLE_TEXT_DATASET_DIR
    samples = validate_dataset(subset_dataset(tmp_path / "data", 2, source), caption_format=family.caption_format,
                               min_side=16).samples
    cache = FeatureCache(tmp_path / "cache", namespace="test")
    items = [cache.item(s, (64, 64)) for s in samples]
    fill_cache(cache, items, functools.partial(family.encode_sample, model), rank=0, world_size=1, max_pixels=10**8)
    entries = [CachedFeatures(cache, items, family.text_feature_keys)[i] for i in range(2)]
    image_keys = set(cache.shapes(items[0])) - set(family.text_feature_keys)
    assert all(set(image) == image_keys for _, image in entries)  # what workers would pass: no text
    keys = family.text_feature_keys
    cached = TextFeatures(cache, items, keys, family.collate)(entries)
    online = TextFeatures(cache, items, keys, family.collate, device=torch.device("cpu"),
                          encode=lambda caption: family.encode_text(model, caption))(entries)
    assert cached[0] == online[0] == [0, 1] and cached[1].keys() == online[1].keys()
    assert all(torch.equal(cached[1][k], online[1][k]) for k in cached[1])
    # negative control: the comparison sees the captions
    other = TextFeatures(cache, items, keys, family.collate, device=torch.device("cpu"),
                         encode=lambda caption: family.encode_text(model, caption.replace("a", "the")))(entries)
    assert not torch.equal(other[1]["prompt_embeds"], cached[1]["prompt_embeds"])


def test_fibo_text_feature_specs_are_what_encode_text_makes_without_encoding(fibo, one_thread):
    family, model = fibo
    for caption in CAPTIONS:
        made = family.encode_text(model, caption)
        specs = family.text_feature_specs(model, caption)
        assert all(t.device.type == "meta" for t in specs.values())
        assert {k: (t.shape, t.dtype) for k, t in specs.items()} == {k: (t.shape, t.dtype) for k, t in made.items()}


def test_auto_caches_within_the_budget_and_asks_the_size_only_when_needed():
    asked = []

    def size(value):
        return lambda: asked.append(value) or value

    gib = 2**30
    assert choose_text_features("auto", has_text_features=True, cache_bytes=size(gib), budget_gib=1.0) == "cache"
    assert choose_text_features("auto", has_text_features=True, cache_bytes=size(gib + 1), budget_gib=1.0) == "online"
    assert asked == [gib, gib + 1]
    assert choose_text_features("cache", has_text_features=True, cache_bytes=size(0), budget_gib=0) == "cache"
    assert choose_text_features("online", has_text_features=True, cache_bytes=size(0), budget_gib=1) == "online"
    # a family whose features do not split (the benchmark's reference recipe) always caches
    assert choose_text_features("online", has_text_features=False, cache_bytes=size(0), budget_gib=1) == "cache"
    assert len(asked) == 2


@pytest.mark.parametrize("override, field", [("data.text_features=sometimes", "data.text_features"),
                                             ("data.text_cache_budget_gib=-1", "data.text_cache_budget_gib")])
def test_bad_text_feature_options_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_engine_config(None, [override])


# ---- the service prunes a finished run -------------------------------------------------------------

def test_a_finished_run_loses_its_cache_and_old_resume_states_never_its_checkpoints(tmp_path):
    run_dir = tmp_path / "model-1"
    checkpointer = Checkpointer(run_dir)
    for step in (100, 200):
        checkpointer.publish(step, lambda staging: (staging / "pytorch_lora_weights.safetensors").write_bytes(b"x"))
    files = {name: (lambda handle, data=data: handle.write(data))
             for name, data in {"adapter.safetensors": b"a", "optimizer.pt": b"o", "state.json": b"{}"}.items()}
    checkpointer.save_resume(100, files)
    checkpointer.save_resume(200, files)
    (run_dir / "resume" / "step-300").mkdir()  # a state that never verified: newer, but not valid
    (run_dir / "cache").mkdir()
    (run_dir / "cache" / "entry.safetensors").write_bytes(b"0" * 1000)

    removed = prune_finished_run(run_dir)
    assert {p.name for p in removed} == {"cache", "step-100", "step-300"}
    assert not (run_dir / "cache").exists()
    assert checkpointer.resume_steps() == [200] and checkpointer.latest_resume() == run_dir / "resume" / "step-200"
    assert checkpointer.published_steps() == [200, 100]
    assert all(Checkpointer.verify(checkpointer.path_for(s)) for s in (100, 200))
    assert prune_finished_run(run_dir) == []  # nothing left to prune


# ---- PEFT's input cast under autocast ---------------------------------------------------------------

def copy_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::_to_copy", "aten::copy_"))


def test_lora_input_cast_is_off_under_autocast_same_loss_and_gradients_fewer_copies(tiny_fibo_base, one_thread):
    family = FiboFamily()
    model = family.load(str(tiny_fibo_base), device=torch.device("cpu"), weight_dtype=torch.bfloat16)
    torch.manual_seed(0)
    add_lora(model.denoiser, rank=4, targets=family.default_lora_targets, init="gaussian")
    batch = family.collate([family.encode_sample(model, torch.rand(1, 3, 32, 32) * 2 - 1, CAPTIONS[1])])
    lora_params = [p for p in model.denoiser.parameters() if p.requires_grad]

    results, copies = {}, {}

    def step(enabled: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = family.compute_loss(model.denoiser, batch, torch.Generator().manual_seed(1))
        loss.backward()
        results[enabled] = loss.detach(), [p.grad.clone() for p in lora_params]
        for p in lora_params:
            p.grad = None

    for enabled in (True, False):
        set_lora_input_casting(model.denoiser, enabled)
        copies[enabled] = copy_ops(functools.partial(step, enabled))
    assert torch.equal(results[True][0], results[False][0])
    assert all(torch.equal(a, b) for a, b in zip(results[True][1], results[False][1]))
    assert copies[False] < copies[True], copies
    # outside autocast (a render) the cast is needed: the bf16 input meets the fp32 adapter
    with torch.no_grad(), pytest.raises(RuntimeError):
        family.compute_loss(model.denoiser, batch, torch.Generator().manual_seed(1))
    with torch.no_grad(), lora_input_casting(model.denoiser):
        family.compute_loss(model.denoiser, batch, torch.Generator().manual_seed(1))
    assert not any(m.cast_input_dtype_enabled for m in model.denoiser.modules() if hasattr(m, "cast_input_dtype_enabled"))


# ---- compile_blocks keeps gradient checkpointing, for every family ------------------------------------

def denoisers(tiny_fibo_base, legacy_bases):
    yield "fibo", BriaFiboTransformer2DModel.from_pretrained(tiny_fibo_base, subfolder="transformer")
    yield "bria-3.2", BriaTransformer2DModel.from_pretrained(legacy_bases["bria-3.2"], subfolder="transformer")
    yield "bria-2.3", UNet2DConditionModel.from_pretrained(legacy_bases["bria-2.3"], subfolder="unet")


def checkpointed(denoiser, blocks) -> bool:
    """Every block recomputes its activations: wrapped by the policy, or under the model's own switch."""
    if any(getattr(m, "gradient_checkpointing", False) for m in denoiser.modules()):
        return True
    return bool(blocks) and all(isinstance(b.forward, functools.partial) and b.forward.func is speed._checkpointed
                                for b in blocks)


@pytest.mark.parametrize("compile_blocks", [True, False])
def test_compile_blocks_keeps_checkpointing_on_for_every_family(tiny_fibo_base, legacy_bases, monkeypatch,
                                                                compile_blocks, one_thread):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)  # no GPU here
    cuda = torch.device("cuda")
    for name, denoiser in denoisers(tiny_fibo_base, legacy_bases):
        blocks = family_class(name)().denoiser_blocks(denoiser)
        assert blocks or name == "bria-2.3"
        compiled.clear()
        speed.apply_block_policy(denoiser, blocks, checkpointing=True, compile_blocks=compile_blocks, device=cuda)
        assert checkpointed(denoiser, blocks), name
        assert bool(compiled) == compile_blocks, name
    # negative control: with checkpointing off, nothing recomputes
    for name, denoiser in denoisers(tiny_fibo_base, legacy_bases):
        blocks = family_class(name)().denoiser_blocks(denoiser)
        speed.apply_block_policy(denoiser, blocks, checkpointing=False, compile_blocks=compile_blocks, device=cuda)
        assert not checkpointed(denoiser, blocks), name
