"""json.loads for text that users send (captions, prompts, request bodies, form fields).

Python's json accepts NaN and Infinity, which are not JSON and which json.dumps writes back out,
and it recurses once per level of nesting, so a few kilobytes of "[[[[..." exhaust the interpreter's
recursion limit (a RecursionError, not a ValueError). Here both are a ValueError that says what is
wrong, and the same limits hold in the CLI, the engine and the service.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

MAX_DEPTH = 32
"""the deepest nesting accepted: a FIBO caption nests 3 levels; 32 leaves room for any real document"""
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def loads(text: str | bytes) -> Any:
    """The JSON value of `text`, or ValueError: not JSON, NaN or Infinity, or nested deeper than MAX_DEPTH."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text.count("[") + text.count("{") > MAX_DEPTH:  # only then can it be too deep: skip the scan otherwise
        _check_depth(text)
    return json.loads(text, parse_constant=_reject_constant)


def _check_depth(text: str) -> None:
    depth = 0
    for char in _STRING.sub('""', text):  # brackets inside strings do not nest
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ValueError(f"the JSON nests deeper than {MAX_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON (use a number or a string)")
