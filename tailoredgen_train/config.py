"""Engineering configuration: everything a job needs that the Start Training contract does not set.

The contract fields (rank, learning rate, steps, ...) live in `contract.TrainingParameters`; this
module holds resolution, batch size, precision, optimizer details and the like. Each section is a
typed dataclass that validates itself and names the field and the fix. YAML files in `configs/`
are only a serialisation of these objects: unknown keys are refused, never ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml

from .contract import ASPECT_RATIOS, REQUEST_FIELDS
from .errors import ConfigError, did_you_mean


class _InvalidField(ConfigError):
    """A value out of its range; `field_path` lets the loader say where the value came from."""

    def __init__(self, message: str, field_path: str):
        super().__init__(message)
        self.field_path = field_path


def _require(condition: bool, field_path: str, value: Any, fix: str) -> None:
    if not condition:
        raise _InvalidField(f"config field {field_path}={value!r} is invalid: {fix}", field_path)


@dataclass(kw_only=True)
class DataConfig:
    resolution: int = 1024
    """Bucket scale in pixels: 1024 is FIBO's ~1 MP set; 512 is the quick, quarter-area option."""
    min_side: int = 256
    """Preflight refuses images whose shorter side is below this (Bria upscales from 256 at most)."""
    max_pixels: int = 64_000_000
    """Larger images are refused as decompression bombs."""
    batch_size: int = 1
    """Micro-batch per process; batches never mix aspect-ratio buckets."""
    num_workers: int = 0
    """DataLoader workers reading cached image features; 0 reads in the training process. Text
    features are never passed through them: they are read (or encoded) in the training process."""
    text_features: Literal["auto", "cache", "online"] = "auto"
    """cache: the text encoder's outputs are cached with the latents and read memory-mapped each step
    (FIBO: ~156 KB per caption token in bf16); online: the text encoder stays on the device and
    encodes each micro-batch's captions (FIBO: a few percent of a step); auto: cache while the text
    cache of the whole dataset fits data.text_cache_budget_gib, else online."""
    text_cache_budget_gib: float = 16.0
    """The largest text cache `text_features: auto` writes (GiB, for the whole dataset)."""

    def __post_init__(self) -> None:
        _require(self.resolution >= 64, "data.resolution", self.resolution, "use 64 or more (1024 for FIBO)")
        _require(self.min_side >= 16, "data.min_side", self.min_side, "use 16 or more")
        _require(self.max_pixels > 0, "data.max_pixels", self.max_pixels, "use a positive pixel count")
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "use 1 or more")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "use 0 or more")
        _require(self.text_features in ("auto", "cache", "online"), "data.text_features", self.text_features,
                 "use auto, cache or online")
        _require(self.text_cache_budget_gib >= 0, "data.text_cache_budget_gib", self.text_cache_budget_gib,
                 "use 0 (always online under auto) or a positive size in GiB")


@dataclass(kw_only=True)
class OptimConfig:
    global_batch_size: int = 1
    """Samples per optimizer step on any number of processes (total_training_steps counts optimizer
    steps): each process accumulates global_batch_size / (data.batch_size x processes) micro-batches,
    so the same job gives the same LoRA on 1 or N processes, N times faster."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    weight_decay: float = 1e-3
    """Bria's FIBO recipe uses 1e-3."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_num_cycles: int = 1
    """Cycles of cosine_with_restarts."""
    lr_power: float = 1.0
    """Power of the polynomial schedule."""
    max_consecutive_nonfinite: int = 3
    """Non-finite steps in a row that are skipped before the run fails with non_finite_loss."""
    optimizer: Literal["adamw", "adamw_8bit", "adamw_cpu_offload"] = "adamw"
    """adamw: torch AdamW (fused on CUDA). adamw_8bit: bitsandbytes' 8-bit states (needs bitsandbytes).
    adamw_cpu_offload: fp32 master weights and states in host memory, stepped on the CPU (slow, small)."""

    def __post_init__(self) -> None:
        _require(self.optimizer in ("adamw", "adamw_8bit", "adamw_cpu_offload"), "optim.optimizer", self.optimizer,
                 "use adamw, adamw_8bit (needs bitsandbytes) or adamw_cpu_offload")
        _require(self.global_batch_size >= 1, "optim.global_batch_size", self.global_batch_size,
                 "use 1 or more (samples per optimizer step, over all processes)")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", self.max_grad_norm, "use 0 (off) or a positive norm")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "use 0 or more")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"optim.{name}", value, "use a value in [0, 1)")
        _require(self.adam_epsilon > 0, "optim.adam_epsilon", self.adam_epsilon, "use a small positive number")
        _require(self.lr_num_cycles >= 1, "optim.lr_num_cycles", self.lr_num_cycles, "use 1 or more")
        _require(self.lr_power > 0, "optim.lr_power", self.lr_power, "use a positive power")
        _require(self.max_consecutive_nonfinite >= 0, "optim.max_consecutive_nonfinite",
                 self.max_consecutive_nonfinite, "use 0 (fail on the first) or more")


@dataclass(kw_only=True)
class LoraConfig:
    init: Literal["gaussian", "default"] = "gaussian"
    """PEFT init of lora_A (lora_B starts at zero either way); Bria's recipe uses gaussian."""
    target_modules: list[str] | None = None
    """Module-name suffixes to adapt; null means the family's default list (Bria's targets)."""

    def __post_init__(self) -> None:
        _require(self.init in ("gaussian", "default"), "lora.init", self.init, "use 'gaussian' or 'default'")
        if self.target_modules is not None:
            _require(
                isinstance(self.target_modules, list) and all(isinstance(m, str) and m for m in self.target_modules)
                and len(self.target_modules) > 0,
                "lora.target_modules", self.target_modules, "give a non-empty list of module-name suffixes, or null",
            )


@dataclass(kw_only=True)
class RunConfig:
    seed: int = 0
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto: bf16 on an accelerator, fp32 on CPU. fp16 is refused: flow DiTs overflow in it."""
    gradient_checkpointing: bool | int | str = False
    """Trade compute for memory (full FIBO at 1024^2 needs it below ~65 GiB): false, true (every
    block), N (checkpoint N transformer blocks, keep the others' activations) or "auto" (as many
    blocks as the device's free memory requires; none on CPU)."""
    compile_blocks: bool = False
    """Regional torch.compile of each transformer block (CUDA only; ignored with a warning on CPU)."""
    host_sync: Literal["auto", "step", "log"] = "auto"
    """When a step waits for the device to read its loss back: "step" every step; "log" only on
    logging/checkpoint steps, non-finite steps then being skipped on the device (fused AdamW on CUDA
    only); "auto" picks "log" where that is possible."""
    allow_tf32: bool = True
    log_every: int = 10
    """Optimizer steps between tracker/log lines (the progress bar updates every step)."""
    log_with: Literal["tensorboard", "none"] = "tensorboard"
    log_samples: bool = False
    """Print the sample ids each process trains on (for checking data sharding)."""
    cache_dir: str | None = None
    """Where cached latents/text features go; null means OUTPUT/cache."""
    stop_after_steps: int | None = None
    """Smoke runs: stop after this many steps (resume state saved, --resume continues); null = the full run."""
    allow_changed_on_resume: list[str] = field(default_factory=list)
    """Fields that `train --resume` may change from the saved job (e.g. [total_training_steps,
    run.log_every]); any other difference is refused. Like stop_after_steps, it is never carried over."""

    def __post_init__(self) -> None:
        _require(self.mixed_precision in ("auto", "no", "bf16"), "run.mixed_precision", self.mixed_precision,
                 "use auto, no or bf16 (fp16 overflows in FIBO-class transformers)")
        _require(self.log_every >= 1, "run.log_every", self.log_every, "use 1 or more")
        _require(self.log_with in ("tensorboard", "none"), "run.log_with", self.log_with, "use tensorboard or none")
        _require(isinstance(self.seed, int) and self.seed >= 0, "run.seed", self.seed, "use a non-negative integer")
        if isinstance(self.allow_changed_on_resume, str):  # --set run.allow_changed_on_resume=rank,data.resolution
            self.allow_changed_on_resume = [n.strip() for n in self.allow_changed_on_resume.split(",") if n.strip()]
        _require(isinstance(self.allow_changed_on_resume, list)
                 and all(isinstance(n, str) and n for n in self.allow_changed_on_resume),
                 "run.allow_changed_on_resume", self.allow_changed_on_resume,
                 "give a list of field names, e.g. [total_training_steps, data.resolution]")
        _require(self.stop_after_steps is None or self.stop_after_steps >= 1, "run.stop_after_steps",
                 self.stop_after_steps, "use 1 or more, or null for the full run")
        policy = self.gradient_checkpointing
        _require(isinstance(policy, bool) or policy == "auto" or (isinstance(policy, int) and policy >= 0),
                 "run.gradient_checkpointing", policy, 'use true, false, "auto" or a number of blocks (0 or more)')
        _require(isinstance(self.compile_blocks, bool), "run.compile_blocks", self.compile_blocks, "use true or false")
        _require(self.host_sync in ("auto", "step", "log"), "run.host_sync", self.host_sync,
                 "use auto, step (read the loss back every step) or log (only on logging steps)")


@dataclass(kw_only=True)
class ValidationConfig:
    """Sample images rendered during training with the family's own pipeline (main process only)."""

    enabled: bool = True
    prompts: list[str] | str | None = None
    """A list of prompts, or a file with one per line (JSON captions for fibo, plain text for the
    legacy families, which get the dataset's caption_prefix as at training time). null: `num_prompts`
    captions of the training set, chosen deterministically."""
    num_prompts: int = 4
    every: int | None = None
    """Also render every N steps (into OUTPUT/samples/step-N/); every checkpoint renders regardless."""
    at_start: bool = True
    """Render a baseline before step 1 (OUTPUT/samples/step-0/)."""
    seed: int = 0
    """The same seed at every render, so images are comparable across steps."""
    num_inference_steps: int | None = None
    """null: the family's pipeline default."""
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    resolution: int | None = None
    """Rendered area ~ resolution^2; null: data.resolution (what the LoRA is trained at)."""
    aspect_ratio: str = "1:1"
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), "validation.enabled", self.enabled, "use true or false")
        prompts = self.prompts
        _require(prompts is None or (isinstance(prompts, str) and prompts.strip() != "") or (
            isinstance(prompts, list) and len(prompts) > 0 and all(isinstance(p, str) and p.strip() for p in prompts)),
            "validation.prompts", prompts, "give a non-empty list of prompts, a file with one prompt per line, or null")
        _require(isinstance(self.num_prompts, int) and 1 <= self.num_prompts <= 64, "validation.num_prompts",
                 self.num_prompts, "use 1 to 64")
        _require(self.every is None or (isinstance(self.every, int) and self.every >= 1), "validation.every",
                 self.every, "use 1 or more, or null (render at checkpoints only)")
        _require(isinstance(self.at_start, bool), "validation.at_start", self.at_start, "use true or false")
        _require(isinstance(self.seed, int) and self.seed >= 0, "validation.seed", self.seed,
                 "use a non-negative integer")
        _require(self.num_inference_steps is None or (isinstance(self.num_inference_steps, int)
                                                       and 1 <= self.num_inference_steps <= 200),
                 "validation.num_inference_steps", self.num_inference_steps, "use 1 to 200, or null")
        _require(self.guidance_scale is None or (isinstance(self.guidance_scale, (int, float))
                                                 and 0 <= self.guidance_scale <= 30),
                 "validation.guidance_scale", self.guidance_scale, "use 0 to 30, or null")
        _require(self.negative_prompt is None or isinstance(self.negative_prompt, str), "validation.negative_prompt",
                 self.negative_prompt, "use a string or null")
        _require(self.resolution is None or (isinstance(self.resolution, int) and self.resolution >= 64),
                 "validation.resolution", self.resolution, "use 64 or more, or null (data.resolution)")
        _require(self.aspect_ratio in ASPECT_RATIOS, "validation.aspect_ratio", self.aspect_ratio,
                 f"use one of {', '.join(ASPECT_RATIOS)}")
        _require(isinstance(self.lora_scale, (int, float)) and 0 <= self.lora_scale <= 1.5, "validation.lora_scale",
                 self.lora_scale, "use 0 to 1.5")


@dataclass(kw_only=True)
class EngineConfig:
    family: str | None = None
    """The model family the file is written for (fibo, bria-3.2, bria-2.3); a training_version of
    another family is refused. None: the config fits any family."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: RunConfig = field(default_factory=RunConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    model: dict[str, Any] = field(default_factory=dict)
    """Family-specific options, validated by the family (e.g. fibo: max_sequence_length)."""

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches each process accumulates per optimizer step: global batch / (micro-batch x
        processes). A combination that does not divide is refused: rounding would change the result."""
        global_batch, micro_batch = self.optim.global_batch_size, self.data.batch_size
        per_step = micro_batch * num_processes
        if global_batch % per_step:
            fits = sorted({d for d in range(1, global_batch + 1) if global_batch % (micro_batch * d) == 0})
            other_counts = f", or run on {' or '.join(map(str, fits))} process(es)" if fits else ""
            raise ConfigError(
                f"optim.global_batch_size={global_batch} is not a multiple of data.batch_size ({micro_batch}) x "
                f"{num_processes} process(es) = {per_step}: use a global batch size that is a multiple of {per_step} "
                f"(e.g. {per_step * -(-global_batch // per_step)}), a data.batch_size that divides it{other_counts}"
            )
        return global_batch // per_step

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_SIMPLE_TYPES: dict[Any, tuple[type, ...]] = {int: (int,), float: (float, int), bool: (bool,), str: (str,)}
_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "lora": LoraConfig, "run": RunConfig,
             "validation": ValidationConfig}
_TOP_LEVEL = ("family", *_SECTIONS, "model")


def _expected_types(hint: Any) -> tuple[type, ...] | None:
    """The types a field of simple type `hint` (int, float, bool, str, or one of them | None) accepts."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = typing.get_args(hint) if is_union else (hint,)
    simple = [a for a in args if a is not type(None)]
    if len(simple) != 1 or simple[0] not in _SIMPLE_TYPES:
        return None
    return _SIMPLE_TYPES[simple[0]] + ((type(None),) if type(None) in args else ())


def type_problem(cls: type, key: str, value: Any) -> str | None:
    """Why `value` does not fit field `key` of dataclass `cls` ("should be of type int"), or None.
    Checked before construction, so a string never reaches a range comparison."""
    expected = _expected_types(typing.get_type_hints(cls).get(key))
    # bool is an int subclass and YAML's 'yes' is a str: both must be refused where they do not belong
    if expected is None or (isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)):
        return None
    names = " or ".join("null" if t is type(None) else t.__name__ for t in expected)
    return f"should be of type {names}"


def _unknown_key_hint(path: str, candidates: list[str]) -> str:
    """The closest valid name to a misspelt dotted key, or where a training parameter goes instead."""
    key = path.rsplit(".", 1)[-1]
    if path == "optim.gradient_accumulation_steps":  # the engine's own former key, named in old configs
        return (" (replaced by optim.global_batch_size, the samples per optimizer step on any number of "
                "processes: data.batch_size x accumulation x processes; accumulation is derived from it)")
    if key in REQUEST_FIELDS:
        return f" ({key} is a training parameter, not an engine option: pass --{key.replace('_', '-')} to train)"
    return did_you_mean(path, candidates)


def _build_section(name: str, cls: type, raw: Any, origin: Callable[[str], str]) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin(name)}: section '{name}' must be a mapping, got {type(raw).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        keys = [f"{name}.{k}" for k in known]
        raise ConfigError(
            f"{origin(f'{name}.{unknown[0]}')}: unknown key(s) "
            f"{', '.join(f'{name}.{k}' + _unknown_key_hint(f'{name}.{k}', keys) for k in unknown)}; "
            f"'{name}' accepts {', '.join(sorted(known))}"
        )
    for key, value in raw.items():
        problem = type_problem(cls, key, value)
        if problem:
            raise ConfigError(f"{origin(f'{name}.{key}')}: {name}.{key}={value!r} {problem}")
    try:
        return cls(**raw)
    except _InvalidField as exc:
        raise ConfigError(f"{origin(exc.field_path)}: {exc.message}") from None
    except TypeError as exc:  # a wrongly typed value reaching a comparison
        raise ConfigError(f"{origin(name)}: section '{name}': {exc}") from None


def engine_config_from_dict(raw: Mapping[str, Any] | None, source: str = "<dict>",
                            overridden: Mapping[str, str] | None = None) -> EngineConfig:
    """`overridden` maps a dotted key (data.resolution) to the --set that gave it, so that a bad
    value is blamed on the --set, not on the file `source`."""
    raw = dict(raw or {})
    overridden = overridden or {}

    def origin(path: str) -> str:
        return overridden.get(path) or source

    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise ConfigError(
            f"{origin(unknown[0])}: unknown section(s) "
            f"{', '.join(k + _unknown_key_hint(k, list(_TOP_LEVEL)) for k in unknown)}; "
            f"accepted: {', '.join(_TOP_LEVEL)}"
        )
    family = raw.get("family")
    if family is not None and not (isinstance(family, str) and family):
        raise ConfigError(f"{origin('family')}: family={family!r} should name a model family, e.g. family: fibo")
    sections = {name: _build_section(name, cls, raw.get(name), origin) for name, cls in _SECTIONS.items()}
    model = raw.get("model") or {}
    if not isinstance(model, Mapping):
        raise ConfigError(f"{origin('model')}: section 'model' must be a mapping")
    return EngineConfig(family=family, **sections, model=dict(model))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = "; only plain YAML values are accepted (no !!python or other tags)" if "constructor" in problem else ""
    return problem + where + hint


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text}: must look like section.key=value, e.g. data.resolution=512")
    path, value = text.split("=", 1)
    keys = path.strip().split(".")
    if keys != ["family"] and (len(keys) != 2 or not all(keys)):
        raise ConfigError(f"--set {text}: name one key as section.key=value, e.g. data.resolution=512")
    section = keys[0]
    if section not in _TOP_LEVEL:
        raise ConfigError(f"--set {text}: unknown section {section}{_unknown_key_hint(section, list(_TOP_LEVEL))}; "
                          f"accepted: {', '.join(_TOP_LEVEL)}")
    if section in _SECTIONS:
        known = [f"{section}.{f.name}" for f in dataclasses.fields(_SECTIONS[section])]
        if path.strip() not in known:
            raise ConfigError(f"--set {text}: unknown key {path.strip()}{_unknown_key_hint(path.strip(), known)}; "
                              f"'{section}' accepts {', '.join(sorted(k.split('.')[1] for k in known))}")
    try:
        return keys, yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text}: the value is not valid YAML ({_yaml_problem(exc)}); "
                          "quote text that holds YAML syntax, e.g. --set 'lora.target_modules=[to_q, to_k]'") from None


def load_engine_config(path: str | Path | None, overrides: list[str] | None = None) -> EngineConfig:
    """Read a YAML config (or the defaults when path is None) and apply `section.key=value` overrides.
    Every problem is a one-line ConfigError that names the file, or the --set, it comes from."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; pass one of the files in configs/") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read as text: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return apply_overrides(raw, overrides, source)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None, source: str) -> EngineConfig:
    """The config `raw` (a parsed file, or a saved job's engine section) with each `section.key=value`
    applied; a bad value is blamed on its --set, anything else on `source`."""
    overridden: dict[str, str] = {}
    for text in overrides or []:
        keys, value = _parse_override(text)
        node = raw
        for key in keys[:-1]:
            if node.get(key) is None:  # an empty section in the file means defaults
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {key} is not a section in {source}")
        node[keys[-1]] = value
        overridden[".".join(keys)] = f"--set {text}"
    return engine_config_from_dict(raw, source, overridden)
