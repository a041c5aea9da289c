"""FIBO's structured caption format: its fields, and the checks preflight runs on a caption's keys.

The fields, their order, which are required and what each holds come from Bria's own code (the
FIBO repository, `src/fibo_inference/vlm/gemini_api.py`: the `ImageAnalysis` model that validates
captions and the schema text its VLM prompt carries) and from the captions its VLM writes
(`examples/outputs/*.json`). The order is the order FIBO's VLM writes them in, which is also the
order constrained decoding asks for. docs/CAPTIONS.md is the reference for users.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

FieldType = Literal["string", "integer", "score", "object", "array"]

CAPTION_FORMAT_DOC = "docs/CAPTIONS.md"
CAPTION_FORMAT_HINT = (
    f"FIBO captions are structured JSON objects (the fields are listed in {CAPTION_FORMAT_DOC}); "
    "`tailoredgen-train caption DATASET --training-version fibo` writes them for you"
)
# What FIBO's cleaning step writes for the aesthetic and preference scores (worst to best).
SCORE_WORDS = ("very low", "low", "medium", "high", "very high")


@dataclass(frozen=True)
class Field:
    """One caption field. `fields` are the sub-fields of an object, or of each item of an array."""

    name: str
    type: FieldType
    required: bool
    description: str
    fields: tuple[Field, ...] = ()

    def child(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


def _s(name: str, description: str, required: bool = False) -> Field:
    return Field(name, "string", required, description)


OBJECT_FIELDS = (
    _s("description", "A detailed description of the object, 100 words maximum.", True),
    _s("location", 'E.g. "center", "top-left", "bottom-right foreground".', True),
    _s("relationship", "The relationship between this object and the other objects in the image.", True),
    _s("relative_size", 'E.g. "small", "medium", "large within frame".'),
    _s("shape_and_color", "The basic shape and dominant color."),
    _s("texture", 'E.g. "smooth", "rough", "metallic", "furry".'),
    _s("appearance_details", "Any other notable visual details."),
    Field("number_of_objects", "integer", False, "For a cluster of objects: how many there are."),
    _s("pose", "People: the body position."),
    _s("expression", 'People: facial expression and emotion, e.g. "joyful", "calm".'),
    _s("clothing", "People: attire."),
    _s("action", "People: what the person is doing."),
    _s("gender", "People: the gender of the person."),
    _s("skin_tone_and_texture", "People: skin tone and texture."),
    _s("orientation", 'E.g. "upright", "facing left", "lying on its side".'),
)

TEXT_RENDER_FIELDS = (
    _s("text", "The exact text to render.", True),
    _s("location", 'E.g. "center", "top-left".', True),
    _s("size", 'E.g. "medium", "large within frame".', True),
    _s("color", 'E.g. "red".', True),
    _s("font", 'E.g. "serif typeface", "cartoonish".', True),
    _s("appearance_details", "Any other notable visual details."),
)

CAPTION_FIELDS: tuple[Field, ...] = (
    _s("short_description", "A concise summary of the image content, 200 words maximum.", True),
    Field("objects", "array", True, "The prominent foreground and midground objects (FIBO's VLM lists at most 5).",
          OBJECT_FIELDS),
    _s("background_setting", "The overall environment, setting or background, and the background elements "
       "that are not in `objects`.", True),
    Field("lighting", "object", True, "The lighting.", (
        _s("conditions", 'E.g. "bright daylight", "studio lighting", "golden hour".', True),
        _s("direction", 'E.g. "front-lit", "backlit", "side-lit from left".', True),
        _s("shadows", 'E.g. "long, soft shadows", "minimal shadows".'),
    )),
    Field("aesthetics", "object", True, "Composition, colors and mood; FIBO's cleaning adds the scores.", (
        _s("composition", 'E.g. "rule of thirds", "centered", "close-up".', True),
        _s("color_scheme", 'E.g. "monochromatic blue", "high contrast".', True),
        _s("mood_atmosphere", 'E.g. "serene", "energetic", "mysterious".', True),
        Field("aesthetic_score", "score", False, f"One of {', '.join(SCORE_WORDS)}."),
        Field("preference_score", "score", False, f"One of {', '.join(SCORE_WORDS)}."),
    )),
    Field("photographic_characteristics", "object", False, "Camera settings.", (
        _s("depth_of_field", 'E.g. "shallow", "deep", "bokeh background".', True),
        _s("focus", 'E.g. "sharp focus on subject", "soft focus".', True),
        _s("camera_angle", 'E.g. "eye-level", "low angle", "high angle".', True),
        _s("lens_focal_length", 'E.g. "wide-angle", "telephoto", "macro".', True),
    )),
    _s("style_medium", 'The medium, e.g. "photograph", "oil painting", "3D render", "digital illustration".'),
    Field("text_render", "array", False, "Text written in the image; absent or empty when there is none.",
          TEXT_RENDER_FIELDS),
    _s("context", "What kind of image this is, e.g. a concept for an editorial photograph.", True),
    _s("artistic_style", "If not a photograph: its artistic characteristics, 3 words maximum."),
)
FIELD_NAMES = tuple(f.name for f in CAPTION_FIELDS)
_ROOT = Field("caption", "object", True, "", CAPTION_FIELDS)


@dataclass(frozen=True)
class UnknownField:
    """A key that is not one of FIBO's fields at `path` (e.g. "lighting.brightness")."""

    path: str
    closest: str | None

    def describe(self) -> str:
        hint = f" (closest known field: {self.closest!r})" if self.closest else ""
        return f"{self.path!r} is not a FIBO caption field{hint}; FIBO was not trained on it"


def has_known_field(caption: dict[str, Any]) -> bool:
    """False for a JSON object that shares no top-level field with FIBO's captions (`{"foo": "bar"}`)."""
    return any(name in FIELD_NAMES for name in caption)


def unknown_fields(caption: dict[str, Any]) -> list[UnknownField]:
    """Every key of `caption` (at any depth FIBO defines) that FIBO's format does not have."""
    found: list[UnknownField] = []
    _walk(caption, _ROOT, "", found)
    return found


def _walk(value: dict[str, Any], spec: Field, prefix: str, found: list[UnknownField]) -> None:
    for key, item in value.items():
        field = spec.child(key)
        path = f"{prefix}{key}"
        if field is None:
            close = difflib.get_close_matches(key, [f.name for f in spec.fields], n=1, cutoff=0.6)
            found.append(UnknownField(path, f"{prefix}{close[0]}" if close else None))
        elif field.type == "object" and isinstance(item, dict):
            _walk(item, field, f"{path}.", found)
        elif field.type == "array" and isinstance(item, list):
            for index, element in enumerate(item):
                if isinstance(element, dict):
                    _walk(element, field, f"{path}[{index}].", found)
