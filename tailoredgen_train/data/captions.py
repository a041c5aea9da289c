"""Caption normalisation: one canonical string per caption, or a ValueError saying what is wrong."""

from __future__ import annotations

import json
import unicodedata

from .. import strict_json

_ALLOWED_CONTROL = frozenset("\n\t")
_JSON_TYPE_NAMES = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def normalize_json_caption(text: str) -> str:
    """Parse a FIBO structured caption and return its compact JSON form.

    The top level must be a JSON object. The result is `json.dumps(obj, separators=(",", ":"))`
    with ASCII escaping, so equal captions give equal strings. Raises ValueError with json's
    line/column message for invalid JSON, and for NaN, Infinity or nesting deeper than
    strict_json.MAX_DEPTH.
    """
    try:
        obj = strict_json.loads(text)
    except ValueError as e:
        raise ValueError(f"caption is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        kind = _JSON_TYPE_NAMES.get(type(obj), type(obj).__name__)
        raise ValueError(f"caption must be a JSON object ({{...}}) of structured-caption fields, got a JSON {kind}")
    return json.dumps(obj, separators=(",", ":"))


def normalize_text_caption(text: str) -> str:
    """Strip a plain-text caption; reject empty captions and control characters other than \\n and \\t."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("caption is empty")
    for i, ch in enumerate(stripped):
        if ch not in _ALLOWED_CONTROL and unicodedata.category(ch) == "Cc":
            raise ValueError(f"caption contains control character {ch!r} at position {i}; remove it")
    return stripped


def apply_caption_prefix(caption: str, prefix: str | None) -> str:
    """A legacy dataset's caption_prefix before a normalised caption, with one space at the join; a
    blank prefix adds nothing. Training and generation both go through here, so a LoRA is prompted
    exactly as it was trained."""
    if prefix and prefix.strip():
        return prefix.rstrip() + " " + caption
    return caption
