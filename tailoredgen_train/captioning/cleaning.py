"""Turn what FIBO's VLM writes into the caption FIBO trains on.

The rules are those of FIBO's `prepare_clean_caption` (`src/fibo_inference/parse_caption.py` and
`vlm/local_vlm.py`): numeric `aesthetic_score` / `pickascore` become words in `aesthetics`, only
FIBO's ten top-level fields are kept, and empty values (None, "", {}, [], NaN) are dropped at every
depth, a container emptied by that included. The result is stored compact, like every caption.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..data.caption_format import FIELD_NAMES, SCORE_WORDS
from ..data.captions import normalize_json_caption
from .prompts import STOP_SEQUENCES

# FIBO's thresholds: a score below the n-th bound gets the n-th word, above all of them "very high"
AESTHETIC_BOUNDS = (5.5, 6.0, 7.0, 7.6)
PICKASCORE_BOUNDS = (0.78, 0.82, 0.87, 0.91)


def score_word(value: float, bounds: tuple[float, ...]) -> str:
    """FIBO's parse_aesthetic_score / parse_pickascore: a number to "very low" ... "very high"."""
    return next((word for word, bound in zip(SCORE_WORDS, bounds) if value < bound), SCORE_WORDS[-1])


def parse_vlm_output(text: str) -> dict[str, Any]:
    """The JSON object in the VLM's decoded output, cut at FIBO's stop sequences.

    Raises ValueError naming what is wrong: not JSON (e.g. cut off when the token budget ran out),
    or JSON that is not an object.
    """
    for stop in STOP_SEQUENCES:
        text = text.split(stop, 1)[0]
    text = text.strip()
    if not text:
        raise ValueError("the VLM wrote nothing")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"the VLM's output is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"the VLM's output is a JSON {type(value).__name__}, not an object")
    return value


def clean_caption(record: dict[str, Any]) -> dict[str, Any]:
    """FIBO's cleaning of one VLM record (see the module docstring); the input is not modified."""
    scores = {}
    if _is_number(record.get("pickascore")):
        scores["preference_score"] = score_word(record["pickascore"], PICKASCORE_BOUNDS)
    if _is_number(record.get("aesthetic_score")):
        scores["aesthetic_score"] = score_word(record["aesthetic_score"], AESTHETIC_BOUNDS)
    cleaned = _drop_empty({name: record[name] for name in FIELD_NAMES if name in record})
    aesthetics = cleaned.get("aesthetics")
    if isinstance(aesthetics, dict):
        # a number where FIBO's captions have a word (e.g. written by hand): the same mapping
        for name, bounds in (("aesthetic_score", AESTHETIC_BOUNDS), ("preference_score", PICKASCORE_BOUNDS)):
            if _is_number(aesthetics.get(name)):
                aesthetics[name] = score_word(aesthetics[name], bounds)
        aesthetics.update(scores)
    elif scores:
        cleaned["aesthetics"] = scores
    return cleaned


def clean_vlm_output(text: str) -> str:
    """Parse, clean and compact the VLM's output: the caption string that goes into metadata.jsonl.
    Raises ValueError when the output is not a JSON object or nothing is left after cleaning."""
    cleaned = clean_caption(parse_vlm_output(text))
    if not cleaned:
        raise ValueError("the VLM's output has none of FIBO's caption fields")
    return normalize_json_caption(json.dumps(cleaned))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_empty(value: Any) -> bool:
    return (value is None or value == "" or (isinstance(value, (dict, list)) and not value)
            or (isinstance(value, float) and math.isnan(value)))


def _drop_empty(value: Any) -> Any:
    """Children first, so that a container left empty is dropped too (as boltons' remap does)."""
    if isinstance(value, dict):
        items = ((k, _drop_empty(v)) for k, v in value.items())
        return {k: v for k, v in items if not _is_empty(v)}
    if isinstance(value, list):
        return [v for v in map(_drop_empty, value) if not _is_empty(v)]
    return value
