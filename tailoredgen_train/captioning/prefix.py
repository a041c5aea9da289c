"""A legacy dataset's caption prefix from the VLM's plain-text captions of a few of its images.

Bria's prefixes read like "A flat vector illustration of": every caption of the dataset continues
them. The rule here, applied to the plain-text caption of each image (the VLM's short description,
as `caption --training-version 3.2` writes legacy captions):

1. the leading words all the captions share (compared case-insensitively, without trailing
   punctuation), spelled as the first caption spells them;
2. cut after their first "of", which must come within the first MAX_PREFIX_WORDS words and
   after at least one other word ("A watercolor painting of"); shared words without such an "of"
   are not a prefix a caption can continue, so:
3. otherwise the medium's prefix: "A photograph of" (photography), "An illustration of"
   (illustration), "An image of" (neither given).

With an `ip_name` (a defined character) the name follows: "An illustration of Lucy", so that each
caption continues with what the character is doing. A single image's prefix is its caption's
opening up to its first "of".
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PREFIX_WORDS = 8
MEDIUM_PREFIXES = {"photography": "A photograph of", "illustration": "An illustration of", None: "An image of"}
_PUNCTUATION = ",.;:!?\"'"


def common_caption_prefix(captions: Sequence[str], *, ip_medium: str | None = None,
                          ip_name: str | None = None) -> str:
    """The caption prefix the rule above gives for these captions (at least one)."""
    if not captions:
        raise ValueError("a caption prefix needs at least one caption")
    word_lists = [caption.split() for caption in captions]
    shared: list[str] = []
    for position, word in enumerate(word_lists[0]):
        key = _key(word)
        if not key or any(len(words) <= position or _key(words[position]) != key for words in word_lists[1:]):
            break
        shared.append(word.rstrip(_PUNCTUATION))
    keys = [_key(word) for word in shared[:MAX_PREFIX_WORDS]]
    if "of" in keys[1:]:
        prefix = " ".join(shared[:keys.index("of", 1) + 1])
    else:
        prefix = MEDIUM_PREFIXES.get(ip_medium, MEDIUM_PREFIXES[None])
    return f"{prefix} {ip_name.strip()}" if ip_name and ip_name.strip() else prefix


def _key(word: str) -> str:
    return word.strip(_PUNCTUATION).casefold()
