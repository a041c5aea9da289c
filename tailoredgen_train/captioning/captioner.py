"""The captioner: one loaded VLM that captions images, expands and refines JSON prompts.

Load it once (`Captioner.load`) and call it as often as needed; calls are serialised by a lock, so
a service worker can keep one warm and feed it images from a queue. Every output is decoded under
the caption grammar (grammar.py, constrained.py) and cleaned as FIBO's code cleans it
(cleaning.py). What still fails (the token budget ran out, which only a budget below the grammar's
bound allows) is retried once at another seed and then reported, never returned as a caption.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import LogitsProcessorList

from ..data.captions import normalize_json_caption, normalize_text_caption
from ..data.images import ImageProblem, load_rgb
from ..errors import CaptionFailedError, CaptionInputError
from .cleaning import clean_vlm_output, parse_vlm_output
from .constrained import CaptionConstraint, GrammarVocabulary
from .grammar import CaptionGrammar, CaptionLimits, caption_grammar, text_grammar
from .loading import DEFAULT_VLM, FIBO_MAX_PIXELS, FIBO_MIN_PIXELS, load_vlm
from .prompts import Messages, Sampling, generate_messages, images_of, inspire_messages, refine_messages
from .visual_schema import check_image_count, shared_fields

logger = logging.getLogger(__name__)
CaptionFormat = Literal["json", "text"]


@dataclass(frozen=True)
class CaptionResult:
    """One image's outcome: `caption` when it worked, else `code` ("caption_failed") and `detail`.
    `raw` is the VLM's decoded text and `tokens` the number of tokens it generated, on the last attempt."""

    caption: str | None
    code: str | None = None
    detail: str | None = None
    raw: str | None = None
    attempts: int = 1
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.caption is not None


@dataclass(frozen=True)
class _Output:
    text: str
    finished: bool  # ended with an end-of-sequence token, within the budget
    tokens: int


class Captioner:
    """A Qwen3-VL (FIBO's VLM by default) with FIBO's prompts and sampling, decoding under the caption
    grammar. `batch_size` images go through `generate` together."""

    def __init__(self, model, processor, *, limits: CaptionLimits | None = None, sampling: Sampling = Sampling(),
                 max_new_tokens: int | None = None, batch_size: int = 8, source: str = ""):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processor = processor
        self.limits = limits or CaptionLimits()
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.source = source
        tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = sorted({*eos, tokenizer.eos_token_id} - {None})
        self.pad_token_id = tokenizer.pad_token_id
        self.vocabulary = GrammarVocabulary(tokenizer, model.config.text_config.vocab_size, self.eos_token_ids)
        self._lock = threading.Lock()
        self._warned_budgets: set[int] = set()

    @classmethod
    def load(cls, vlm: str = DEFAULT_VLM, *, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, min_pixels: int = FIBO_MIN_PIXELS, max_pixels: int = FIBO_MAX_PIXELS,
             **options: Any) -> Captioner:
        """Load `vlm` (hub id or folder): bf16 on CUDA, fp32 on CPU unless `dtype` says otherwise."""
        loaded = load_vlm(vlm, device=device, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels)
        return cls(loaded.model, loaded.processor, source=loaded.source, **options)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- public tasks -------------------------------------------------------------------------------

    def caption_images(self, images: Sequence[Image.Image | str | Path], *, caption_format: CaptionFormat = "json",
                       visual_schema: Mapping[str, Any] | None = None, caption_prefix: str | None = None,
                       seed: int = 0) -> list[CaptionResult]:
        """One caption per image, in order: compact JSON in FIBO's format (`caption_format="json"`,
        kept consistent with `visual_schema`), or a plain-text caption (`"text"`) that continues
        `caption_prefix` (the prefix itself is not part of it, as in a legacy dataset's metadata)."""
        if caption_format == "json":
            if caption_prefix:
                raise CaptionInputError("caption_prefix is for legacy (text) captions; FIBO captions are JSON")
            grammar, finish = caption_grammar(self.limits, visual_schema), clean_vlm_output
        elif caption_format == "text":
            if visual_schema:
                raise CaptionInputError("a visual schema is for FIBO (JSON) captions, not legacy text captions")
            grammar, finish = text_grammar(self.limits, caption_prefix), _text_caption(caption_prefix)
        else:
            raise ValueError(f'caption_format must be "json" or "text", got {caption_format!r}')
        pictures = [image if isinstance(image, Image.Image) else _load(image) for image in images]
        results: list[CaptionResult] = []
        for start in range(0, len(pictures), self.batch_size):
            batch = [inspire_messages(image) for image in pictures[start:start + self.batch_size]]
            results += self._complete(batch, grammar, finish, seed + start)
        return results

    def visual_schema(self, images: Sequence[Image.Image | str | Path], *, seed: int = 0) -> dict[str, Any]:
        """What 5 to 10 images share, in FIBO's caption format (see visual_schema.shared_fields)."""
        check_image_count(len(images))
        results = self.caption_images(images, seed=seed)
        captions = [json.loads(r.caption) for r in results if r.ok]
        if not captions:
            raise CaptionFailedError(f"none of the {len(images)} images could be captioned: {results[0].detail}",
                                     raw=results[0].raw)
        return shared_fields(captions)

    def expand_prompt(self, text: str, schema: Mapping[str, Any] | None = None, *, seed: int = 0) -> str:
        """A JSON prompt (compact) for a short text prompt (`<generate>`); the fields `schema` fixes
        (a visual schema) have its values."""
        if not text.strip():
            raise CaptionInputError("the prompt to expand is empty")
        return self._one(generate_messages(text), caption_grammar(self.limits, schema), seed)

    def refine(self, json_prompt: str, instruction: str, *, seed: int = 0) -> str:
        """`json_prompt` with `instruction` applied (`<refine>`), as compact JSON."""
        try:
            normalize_json_caption(json_prompt)
        except ValueError as e:
            raise CaptionInputError(f"the prompt to refine must be a JSON object: {e}") from None
        if not instruction.strip():
            raise CaptionInputError("the refine instruction is empty")
        return self._one(refine_messages(json_prompt, instruction), caption_grammar(self.limits), seed)

    # ---- generation ---------------------------------------------------------------------------------

    def _one(self, messages: Messages, grammar: CaptionGrammar, seed: int) -> str:
        result = self._complete([messages], grammar, clean_vlm_output, seed)[0]
        if not result.ok:
            raise CaptionFailedError(f"the VLM did not produce a JSON prompt: {result.detail}", raw=result.raw)
        return result.caption

    def _complete(self, batch: list[Messages], grammar: CaptionGrammar, finish: Callable[[str], str],
                  seed: int) -> list[CaptionResult]:
        """Generate, finish (parse + clean) each output, and retry the failures once at seed + 1."""
        results: list[CaptionResult | None] = [None] * len(batch)
        pending = list(range(len(batch)))
        for attempt in (1, 2):
            outputs = self._generate([batch[i] for i in pending], grammar, seed + attempt - 1)
            failed = []
            for i, output in zip(pending, outputs):
                results[i] = _finish(output, finish, attempt, self._budget(grammar))
                if not results[i].ok:
                    failed.append(i)
            pending = failed
            if not pending:
                break
        return results

    def _budget(self, grammar: CaptionGrammar) -> int:
        bound = grammar.token_bound()
        if self.max_new_tokens is None:
            return bound
        if self.max_new_tokens < bound and self.max_new_tokens not in self._warned_budgets:
            self._warned_budgets.add(self.max_new_tokens)
            logger.warning("max_new_tokens=%d is below the caption grammar's bound of %d tokens: a caption can "
                           "run out of tokens (it is then retried once, then reported)", self.max_new_tokens, bound)
        return self.max_new_tokens

    def model_inputs(self, batch: list[Messages]) -> dict[str, torch.Tensor]:
        """The processor's tensors for a batch of chat turns (chat template, image tokens, left
        padding), on the model's device; floating ones (pixels) in the model's dtype."""
        processor = self.processor
        texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in batch]
        images = [image for messages in batch for image in images_of(messages)]
        inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        return {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def _generate(self, batch: list[Messages], grammar: CaptionGrammar, seed: int) -> list[_Output]:
        processor = self.processor
        inputs = self.model_inputs(batch)
        constraint = CaptionConstraint(self.vocabulary, [grammar] * len(batch))
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with self._lock, torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)  # reproducible, without moving the caller's random state
            generated = self.model.generate(
                **inputs, logits_processor=LogitsProcessorList([constraint]), do_sample=True,
                temperature=self.sampling.temperature, top_p=self.sampling.top_p,
                max_new_tokens=self._budget(grammar), eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id,
            )
        new_tokens = generated[:, inputs["input_ids"].shape[1]:].tolist()
        outputs = []
        for row in new_tokens:
            end = next((n for n, token in enumerate(row) if token in self.eos_token_ids), None)
            kept = row if end is None else row[:end]
            outputs.append(_Output(processor.tokenizer.decode(kept, skip_special_tokens=True), end is not None,
                                   len(kept)))
        return outputs


def load_captioner(vlm: str = DEFAULT_VLM, *, string_tokens: int | None = None, max_pixels: int | None = None,
                   **options: Any) -> Captioner:
    """`Captioner.load` with the knobs the CLI and the service expose: one token allowance for every
    string value (shorter captions, quick runs), and the largest image area given to the VLM (the
    smallest follows it down when it is below FIBO's)."""
    limits = CaptionLimits().with_string_tokens(string_tokens) if string_tokens else CaptionLimits()
    max_pixels = max_pixels or FIBO_MAX_PIXELS
    return Captioner.load(vlm, min_pixels=min(FIBO_MIN_PIXELS, max_pixels), max_pixels=max_pixels, limits=limits,
                          **options)


def _load(path: str | Path) -> Image.Image:
    """An image file as training reads it (EXIF-rotated, alpha on black, 8-bit RGB)."""
    try:
        return load_rgb(path)
    except ImageProblem as e:
        raise CaptionInputError(f"{path}: {e.reason} — {e.detail}") from None


def _finish(output: _Output, finish: Callable[[str], str], attempt: int, budget: int) -> CaptionResult:
    if not output.finished:
        return CaptionResult(None, "caption_failed", f"the token budget ({budget}) ran out before the caption "
                             "closed; raise max_new_tokens", output.text, attempt, output.tokens)
    try:
        return CaptionResult(finish(output.text), raw=output.text, attempts=attempt, tokens=output.tokens)
    except ValueError as e:
        return CaptionResult(None, "caption_failed", str(e), output.text, attempt, output.tokens)


def _text_caption(caption_prefix: str | None) -> Callable[[str], str]:
    """The legacy caption in a text grammar's output: its short_description after the prefix."""
    prefix = (caption_prefix or "").strip()

    def finish(text: str) -> str:
        description = parse_vlm_output(text).get("short_description", "")
        if prefix:
            if not description.startswith(prefix + " "):
                raise ValueError(f"the caption does not continue the caption prefix {prefix!r}")
            description = description[len(prefix) + 1:]
        return normalize_text_caption(description)

    return finish


def fibo_prompt(prompt: str, captioner: Captioner | None, *, schema: Mapping[str, Any] | None = None,
                seed: int = 0) -> tuple[str, bool]:
    """The JSON prompt FIBO generates from: `prompt` itself (compacted) when it is a JSON object,
    else `prompt` expanded by `captioner` (`<generate>`). Returns (JSON, whether it was expanded), so
    that a caller can report the JSON it used. Without a captioner a plain-text prompt is refused."""
    stripped = prompt.strip()
    if stripped.startswith("{"):
        try:
            return normalize_json_caption(stripped), False
        except ValueError as e:
            raise CaptionInputError(f"the prompt looks like JSON but is not a JSON object: {e}") from None
    if captioner is None:
        raise CaptionInputError("FIBO prompts are structured JSON; pass a JSON prompt, or configure a captioning "
                                "model (--vlm) to expand a plain-text prompt into one")
    return captioner.expand_prompt(stripped, schema, seed=seed), True
