"""Load a Qwen3-VL captioner (FIBO's VLM by default) with the classes FIBO's own code uses:
`Qwen3VLForConditionalGeneration` and the model's processor."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.utils import is_torchvision_available

from ..errors import VlmInvalidError
from .prompts import DEFAULT_VLM
VLM_MODEL_TYPES = ("qwen3_vl",)
# FIBO's processor kwargs (local_vlm.py): images are resized to between 256 and 1024 28x28 tiles
FIBO_MIN_PIXELS = 256 * 28 * 28
FIBO_MAX_PIXELS = 1024 * 28 * 28
_HELP = ("--vlm takes a hub id (default briaai/FIBO-vlm) or a folder with a Qwen3-VL model: config.json, "
         "weights, tokenizer and preprocessor config, as save_pretrained writes them")


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video processor, which transformers cannot build without
    torchvision. Captioning never passes videos, and the processor's text and image path (the image
    tokens it inserts, mm_token_type_ids) is Qwen3VLProcessor's own."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # get_attributes() reads this signature: image_processor and tokenizer only
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@dataclass
class LoadedVlm:
    model: Qwen3VLForConditionalGeneration
    processor: Qwen3VLProcessor
    source: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """As the engine: bf16 on CUDA (FIBO runs its VLM in bf16), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_vlm(vlm: str) -> str:
    """A folder, a hub id, or a diffusers folder one of whose components is the Qwen3-VL."""
    path = Path(vlm)
    if path.is_dir() and not (path / "config.json").is_file():
        for sub in sorted(p for p in path.iterdir() if (p / "config.json").is_file()):
            if _model_type(sub / "config.json") in VLM_MODEL_TYPES:
                return str(sub)
        raise VlmInvalidError(f"{vlm} has no config.json, and none of its subfolders holds a Qwen3-VL. {_HELP}")
    if not path.exists() and (vlm.startswith((".", "/", "~")) or vlm.count("/") != 1):
        raise VlmInvalidError(f"{vlm} does not exist and is not a hub id (owner/name). {_HELP}")
    return vlm


def load_vlm(vlm: str = DEFAULT_VLM, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
             min_pixels: int = FIBO_MIN_PIXELS, max_pixels: int = FIBO_MAX_PIXELS) -> LoadedVlm:
    """Load `vlm`'s model (eval mode, on `device` in `dtype`) and processor. Raises VlmInvalidError
    when it cannot be loaded or is not a Qwen3-VL."""
    source = resolve_vlm(vlm)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise VlmInvalidError(f"cannot read the model config of {source}: {e}. {_HELP}") from None
    if config.model_type not in VLM_MODEL_TYPES:
        raise VlmInvalidError(f"{source} is a {config.model_type!r} model, not a Qwen3-VL; captioning needs FIBO's "
                              f"VLM or another Qwen3-VL. {_HELP}")
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    try:
        processor = _load_processor(source, size)
        model = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=dtype, device_map=str(device))
    except (OSError, ValueError, KeyError) as e:
        raise VlmInvalidError(f"cannot load the Qwen3-VL at {source}: {e}. {_HELP}") from None
    model.eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # batched generation continues every row from its last token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as FIBO's engine does
    return LoadedVlm(model=model, processor=processor, source=source)


def _load_processor(source: str, size: dict[str, int]) -> Qwen3VLProcessor:
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(source, size=size)
    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = AutoImageProcessor.from_pretrained(source, size=size)
    chat_template = tokenizer.chat_template or _processor_chat_template(source)
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def _processor_chat_template(source: str) -> str | None:
    """The chat template a processor folder keeps beside the tokenizer (chat_template.jinja/.json)."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _model_type(config_file: Path) -> Any:
    try:
        return json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
