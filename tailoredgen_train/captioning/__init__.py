"""Captions and JSON prompts from a local VLM (FIBO's `briaai/FIBO-vlm`, a Qwen3-VL), decoded under
FIBO's caption format so that every output is a valid caption.

    captioner = Captioner.load("briaai/FIBO-vlm")            # once; keep it warm
    captioner.caption_images([image], caption_format="json")  # -> [CaptionResult]
    captioner.expand_prompt("a cat on a sofa")                # -> compact JSON prompt
    caption_dataset("my_dataset/", captioner)                 # -> CaptionSummary

Names are imported on first use, so that the CLI (which registers the captioning commands) does not
load transformers and llguidance before a captioning command runs.
"""

from importlib import import_module

_EXPORTS = {
    "CaptionFormat": "captioner", "Captioner": "captioner", "CaptionResult": "captioner", "fibo_prompt": "captioner",
    "load_captioner": "captioner",
    "clean_caption": "cleaning", "clean_vlm_output": "cleaning", "parse_vlm_output": "cleaning",
    "CaptionFailure": "dataset", "CaptionSummary": "dataset", "caption_dataset": "dataset",
    "CaptionLimits": "grammar", "caption_grammar": "grammar", "text_grammar": "grammar",
    "DEFAULT_VLM": "prompts", "load_vlm": "loading",
    "Sampling": "prompts", "generate_messages": "prompts", "inspire_messages": "prompts", "refine_messages": "prompts",
    "VISUAL_SCHEMA_FILE": "visual_schema", "load_visual_schema": "visual_schema",
    "save_visual_schema": "visual_schema", "shared_fields": "visual_schema",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
