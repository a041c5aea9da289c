"""The JSON schemas decoding is constrained to, and the token bound that makes every caption close.

A caption schema allows exactly FIBO's fields (data/caption_format.py), in FIBO's order, compact
(no whitespace), with at most `max_objects` objects and `max_text_renders` text renders. Strings
cannot hold control characters and each string value gets a token allowance: once a value has used
it, the constraint (constrained.py) only lets the string close. With that, the longest caption the
grammar admits has a known number of tokens whatever the model or tokenizer, `token_bound()`:

- every token adds at least one byte; a token that starts outside a string value adds at least one
  byte of structure (braces, keys, quotes, commas, literals), so there are at most as many of those
  as the schema's longest structure has bytes;
- the tokens that start inside a string value are its allowance, plus up to 5 that finish an escape
  or a multi-byte character, plus the one that closes it.

Generation with `max_new_tokens >= token_bound()` therefore always ends with a complete caption.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from ..data.caption_format import CAPTION_FIELDS, SCORE_WORDS, Field
from ..errors import CaptionInputError

# the grammar's compact JSON, as FIBO's captions are stored (llguidance's JSON options)
COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# string values: no control characters (C0, DEL, C1), and no leading whitespace
NO_CONTROL_CHARS = "[^\\x00-\\x1f\\x7f-\\x9f]"
TEXT = f"^[^\\x00-\\x20\\x7f-\\x9f]{NO_CONTROL_CHARS}*$"
# tokens after a string's allowance: the rest of an escape (\uXXXX) or of a UTF-8 character, then the quote
STRING_SLACK = 6

# Token allowances of FIBO's string fields, sized from FIBO's prompt ("200 words maximum" for
# short_description, "100 words maximum" for an object's description, "3 words maximum" for
# artistic_style) at ~1.4 tokens a word, and from the lengths of FIBO's example captions.
DEFAULT_STRING_TOKENS = {
    "short_description": 300, "description": 160, "background_setting": 160, "context": 120,
    "relationship": 80, "appearance_details": 80, "composition": 64, "color_scheme": 64, "clothing": 64,
    "shadows": 64, "shape_and_color": 48, "pose": 48, "mood_atmosphere": 40, "texture": 40, "action": 40,
    "skin_tone_and_texture": 40, "direction": 40, "depth_of_field": 40, "focus": 40, "lens_focal_length": 40,
    "text": 48, "conditions": 32, "camera_angle": 32, "expression": 32, "orientation": 32, "location": 24,
    "font": 24, "relative_size": 16, "gender": 16, "size": 16, "color": 16, "style_medium": 16,
    "artistic_style": 16,
}


@dataclass(frozen=True)
class CaptionLimits:
    """How long a caption may get: objects, text renders, and each string value's token allowance."""

    max_objects: int = 5  # FIBO's prompt: "List a maximum of 5 prominent objects"
    max_text_renders: int = 3
    max_number_of_objects: int = 999
    string_tokens: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_STRING_TOKENS))
    default_string_tokens: int = 48
    # a legacy plain-text caption after its caption_prefix: the legacy text encoders read 77 (CLIP, 2.3)
    # to 128 (T5, 3.2) of their own tokens
    text_caption_tokens: int = 80

    def __post_init__(self) -> None:
        counts = {"max_objects": self.max_objects, "max_text_renders": self.max_text_renders,
                  "max_number_of_objects": self.max_number_of_objects}
        for name, value in {**counts, **self.string_tokens, "default_string_tokens": self.default_string_tokens,
                            "text_caption_tokens": self.text_caption_tokens}.items():
            if value < (0 if name in counts else 1):
                raise ValueError(f"CaptionLimits.{name} must be {'>= 0' if name in counts else '>= 1'}, got {value}")

    def with_string_tokens(self, tokens: int) -> CaptionLimits:
        """The same limits with one allowance for every string value (shorter captions, quick runs)."""
        return replace(self, string_tokens={}, default_string_tokens=tokens, text_caption_tokens=tokens)

    @classmethod
    def uniform(cls, tokens: int, *, max_objects: int = 1, max_text_renders: int = 1) -> CaptionLimits:
        """Every string gets `tokens`, few objects: small budgets for tests and smoke runs."""
        return cls(max_objects=max_objects, max_text_renders=max_text_renders).with_string_tokens(tokens)

    def tokens_for(self, name: str) -> int:
        """The allowance of a string value under key `name` (the text caption's is `short_description`
        in a text schema, see text_schema)."""
        return self.string_tokens.get(name, self.default_string_tokens)


@dataclass(frozen=True)
class CaptionGrammar:
    """A JSON schema for the constrained decoder, with the allowances its string values get."""

    schema: dict[str, Any]
    string_tokens: Mapping[str, int]
    default_string_tokens: int

    def tokens_for(self, key: str) -> int:
        return self.string_tokens.get(key, self.default_string_tokens)

    def to_json(self) -> str:
        return json.dumps(self.schema)

    def token_bound(self) -> int:
        """The most tokens any output of this grammar takes, its end-of-sequence token included."""
        structure, content = _bound(self.schema, None, self)
        return structure + content + 1


def caption_grammar(limits: CaptionLimits, visual_schema: Mapping[str, Any] | None = None) -> CaptionGrammar:
    """FIBO's caption format; each value in `visual_schema` (a partial caption) is fixed, so that
    every caption written with it has exactly that value there."""
    fixed = dict(visual_schema or {})
    schema = _object(CAPTION_FIELDS, limits, fixed, "")
    schema["x-guidance"] = COMPACT
    return CaptionGrammar(schema, dict(limits.string_tokens), limits.default_string_tokens)


def text_grammar(limits: CaptionLimits, caption_prefix: str | None) -> CaptionGrammar:
    """A legacy caption: the JSON caption's short_description only, and when a prefix is given the
    description must start with it (the caption is what follows it)."""
    prefix = (caption_prefix or "").strip()
    head = f"{_regex_literal(prefix)} " if prefix else ""
    description = {"type": "string", "pattern": f"^{head}{TEXT[1:]}"}
    schema = {"type": "object", "properties": {"short_description": description}, "required": ["short_description"],
              "additionalProperties": False, "x-guidance": COMPACT}
    # the prefix is forced byte by byte at worst, so its length comes on top of the caption's allowance
    allowance = len(head.encode()) + limits.text_caption_tokens
    return CaptionGrammar(schema, {"short_description": allowance}, allowance)


def _object(fields: tuple[Field, ...], limits: CaptionLimits, fixed: dict[str, Any], path: str) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for spec in fields:
        value = fixed.pop(spec.name, None)
        if value is not None:
            properties[spec.name] = _fixed(spec, value, limits, f"{path}{spec.name}")
        else:
            properties[spec.name] = _value(spec, limits)
        if spec.required or value is not None:
            required.append(spec.name)
    if fixed:
        unknown = ", ".join(f"{path}{name}" for name in fixed)
        raise CaptionInputError(f"the visual schema has field(s) {unknown} that FIBO's captions do not have; "
                                "see docs/CAPTIONS.md for the fields")
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def _value(spec: Field, limits: CaptionLimits) -> dict[str, Any]:
    if spec.type == "string":
        value = {"type": "string", "pattern": TEXT}
    elif spec.type == "score":
        value = {"enum": list(SCORE_WORDS)}
    elif spec.type == "integer":
        value = {"type": "integer", "minimum": 0, "maximum": limits.max_number_of_objects}
    elif spec.type == "object":
        return _object(spec.fields, limits, {}, "")
    else:
        most = limits.max_objects if spec.name == "objects" else limits.max_text_renders
        return {"type": "array", "items": _object(spec.fields, limits, {}, ""), "maxItems": most}
    # optional values may be null, as in FIBO's own schema (the cleaning step drops them)
    return value if spec.required else {"anyOf": [value, {"type": "null"}]}


def _fixed(spec: Field, value: Any, limits: CaptionLimits, path: str) -> dict[str, Any]:
    """A field whose value the visual schema sets: a constant, or an object with some constants."""
    if spec.type == "object" and isinstance(value, dict):
        return _object(spec.fields, limits, dict(value), f"{path}.")
    if spec.type in ("string", "score") and isinstance(value, str) and value.strip():
        if spec.type == "score" and value not in SCORE_WORDS:
            raise CaptionInputError(f"visual schema: {path} must be one of {', '.join(SCORE_WORDS)}, got {value!r}")
        return {"const": value}
    raise CaptionInputError(f"visual schema: {path} must be {_described(spec)}, got {json.dumps(value)[:80]}; "
                            "a visual schema fixes text fields and the fields of lighting, aesthetics and "
                            "photographic_characteristics")


def _described(spec: Field) -> str:
    return {"object": "an object", "array": "absent (lists are per image)", "integer": "absent"}.get(
        spec.type, "a non-empty string")


def _regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it (llguidance's regex syntax)."""
    return "".join(f"\\{c}" if c in "\\.^$|?*+()[]{}/-" else c for c in text)


def _bound(node: dict[str, Any], key: str | None, grammar: CaptionGrammar) -> tuple[int, int]:
    """(structure bytes, string-content tokens) of the longest output of schema `node` under `key`."""
    if "const" in node:
        return len(json.dumps(node["const"]).encode()), 0
    if "enum" in node:
        return max(len(json.dumps(v).encode()) for v in node["enum"]), 0
    if "anyOf" in node:
        options = [_bound(option, key, grammar) for option in node["anyOf"]]
        return max(options, key=sum)
    kind = node.get("type")
    if kind == "null":
        return 4, 0
    if kind == "string":
        return 2, grammar.tokens_for(key or "") + STRING_SLACK
    if kind == "integer":
        return max(len(str(node.get("minimum", 0))), len(str(node["maximum"]))), 0
    if kind == "array":
        structure, content = _bound(node["items"], key, grammar)
        items = node["maxItems"]
        return 2 + items * structure + max(items - 1, 0), items * content
    structure, content = 2, 0  # {}
    for name, child in node["properties"].items():
        s, c = _bound(child, name, grammar)
        structure += len(json.dumps(name).encode()) + 1 + s + 1  # "key": value ,
        content += c
    return structure - (1 if node["properties"] else 0), content
