"""A dataset's visual schema: the caption fields and values its images share, in FIBO's format.

Bria's hosted API makes one from 5 to 10 images (`generate_visual_schema`) and captions a dataset
with it. Here it is derived from the images' own captions: a text field (at the top level or in
lighting, aesthetics or photographic_characteristics) is shared when more than half of the captions
give it the same value (compared case-insensitively, without a final period). Lists (objects,
text_render) describe each image and are never shared. Captioning with a schema fixes those values
in the grammar, so every caption of the dataset carries them and the VLM writes the rest of the
caption after them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.caption_format import CAPTION_FIELDS, Field
from ..errors import CaptionInputError

VISUAL_SCHEMA_IMAGES = (5, 10)  # as Bria's generate_visual_schema
VISUAL_SCHEMA_FILE = "visual_schema.json"


def check_image_count(count: int) -> None:
    low, high = VISUAL_SCHEMA_IMAGES
    if not low <= count <= high:
        raise CaptionInputError(f"a visual schema is made from {low} to {high} images, got {count}")


def shared_fields(captions: Sequence[Mapping[str, Any]], *, min_agreement: float = 0.5) -> dict[str, Any]:
    """The values that more than `min_agreement` of `captions` agree on, as a partial caption."""
    return _shared(CAPTION_FIELDS, list(captions), min_agreement)


def _shared(fields: tuple[Field, ...], captions: list[Mapping[str, Any]], min_agreement: float) -> dict[str, Any]:
    shared: dict[str, Any] = {}
    for spec in fields:
        values = [c.get(spec.name) for c in captions]
        if spec.type == "object":
            inner = _shared(spec.fields, [v if isinstance(v, dict) else {} for v in values], min_agreement)
            if inner:
                shared[spec.name] = inner
        elif spec.type in ("string", "score"):
            spellings = [v for v in values if isinstance(v, str) and v.strip()]
            counts = Counter(_normal(v) for v in spellings)
            if counts:
                value, count = counts.most_common(1)[0]
                if count > min_agreement * len(captions):
                    shared[spec.name] = Counter(v for v in spellings if _normal(v) == value).most_common(1)[0][0]
    return shared


def _normal(text: str) -> str:
    return text.strip().rstrip(".").strip().casefold()


def load_visual_schema(path: str | Path) -> dict[str, Any]:
    """Read a visual schema file: a JSON object in FIBO's caption format, or Bria's API answer
    `{"visual_schema": "<that object as a JSON string>"}`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaptionInputError(f"visual schema {path} does not exist; make one with "
                                "`tailoredgen-train visual-schema IMAGES... --out FILE`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CaptionInputError(f"visual schema {path} is not a JSON file: {e}") from None
    if isinstance(value, dict) and list(value) == ["visual_schema"] and isinstance(value["visual_schema"], str):
        try:
            value = json.loads(value["visual_schema"])
        except ValueError as e:
            raise CaptionInputError(f"visual schema {path}: its visual_schema string is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise CaptionInputError(f"visual schema {path} must be a JSON object of caption fields")
    return value


def save_visual_schema(schema: Mapping[str, Any], path: str | Path) -> Path:
    """Write `schema` as indented JSON, atomically (staging file, fsync, rename)."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    return path
