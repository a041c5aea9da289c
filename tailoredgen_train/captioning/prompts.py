"""The messages FIBO's VLM was trained on, and its sampling settings.

Same format as the FIBO repository's `src/fibo_inference/vlm/local_vlm.py` (`build_messages`): one
user turn whose text starts with a task tag. `<inspire>` after an image asks for the JSON caption of
that image; `<generate>` turns a short prompt into a JSON prompt; `<refine>` applies an edit
instruction to a JSON prompt. The chat template of the loaded processor renders them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

Messages = list[dict[str, Any]]

DEFAULT_VLM = "briaai/FIBO-vlm"  # Bria's open captioner, a Qwen3-VL fine-tuned on these tasks

# FIBO's stop sequences (vlm/common.py): cut there if the tokenizer decodes them as text
STOP_SEQUENCES = ("<|im_end|>", "<|end_of_text|>")


@dataclass(frozen=True)
class Sampling:
    """FIBO's DEFAULT_SAMPLING: temperature 0.2, top_p 0.9 (its 4096-token cap is replaced by the
    caption grammar's own bound, see grammar.py)."""

    temperature: float = 0.2
    top_p: float = 0.9


def inspire_messages(image: Image.Image) -> Messages:
    """The caption of `image`."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "<inspire>"}]}]


def generate_messages(prompt: str) -> Messages:
    """A JSON prompt for a short text prompt."""
    return [{"role": "user", "content": [{"type": "text", "text": f"<generate>\n{prompt.strip()}"}]}]


def refine_messages(structured_prompt: str, instruction: str) -> Messages:
    """`structured_prompt` (JSON text) with `instruction` applied."""
    text = f"<refine>\nInput:\n{structured_prompt.strip()}\nEditing instructions:\n{instruction.strip()}"
    return [{"role": "user", "content": [{"type": "text", "text": text.strip()}]}]


def images_of(messages: Messages) -> list[Image.Image]:
    """The images in `messages`, in order (what the processor needs beside the rendered text)."""
    return [item["image"] for message in messages for item in message["content"]
            if isinstance(item, dict) and item.get("type") == "image"]
