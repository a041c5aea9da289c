"""A transformers LogitsProcessor that keeps every row of a batch inside its caption grammar.

llguidance (a JSON-schema compiler and token-mask engine in Rust, no other dependency) computes, for
each row, which tokens may come next; everything else gets -inf before temperature and top_p see the
logits (transformers applies custom processors before its samplers). On top of the grammar, a small
cursor follows each row's bytes and, once a string value has used its token allowance, only lets a
token that closes the string through (see grammar.py for why that bounds the caption's length).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import LogitsProcessor

from .grammar import CaptionGrammar

logger = logging.getLogger(__name__)
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


class GrammarVocabulary:
    """What llguidance needs to know about a tokenizer, built once per loaded VLM (it walks the
    whole vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.token_bytes = [self._bytes(i) for i in range(vocab_size)]
        self.starts_with_quote = torch.tensor([b[:1] == b'"' for b in self.token_bytes], dtype=torch.bool)
        self._compiled: dict[str, str] = {}
        self._on_device: dict[tuple[torch.device, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def masks_on(self, device: torch.device, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bit shifts for unpacking a bitmask word, tokens that start with a quote) on `device`,
        the latter `width` wide (the logits may be wider than the tokenizer's vocabulary)."""
        key = (device, width)
        if key not in self._on_device:
            quote = self.starts_with_quote[:width]
            quote = torch.nn.functional.pad(quote, (0, width - quote.shape[0]))
            self._on_device[key] = (torch.arange(32, dtype=torch.int32, device=device), quote.to(device))
        return self._on_device[key]

    def _bytes(self, token_id: int) -> bytes:
        try:
            return b"" if self.tokenizer.is_special_token(token_id) else self.tokenizer.decode_bytes([token_id])
        except (ValueError, IndexError):  # an id past the tokenizer's own vocabulary (padded embeddings)
            return b""

    def matcher(self, grammar: CaptionGrammar) -> llguidance.LLMatcher:
        text = grammar.to_json()
        if text not in self._compiled:
            compiled = llguidance.LLMatcher.grammar_from_json_schema(text)
            error = llguidance.LLMatcher.validate_grammar(compiled, self.tokenizer)
            if error:
                raise ValueError(f"caption grammar rejected by llguidance: {error}")
            self._compiled[text] = compiled
        return llguidance.LLMatcher(self.tokenizer, self._compiled[text], log_level=0)


class JsonCursor:
    """Where a row's compact JSON is, byte by byte: inside which string value (and under which key),
    and whether that string could end here (not inside an escape or a multi-byte character)."""

    def __init__(self) -> None:
        self.containers: list[int] = []  # ord("{") or ord("[")
        self.expect_key = False
        self.in_string = False
        self.string_is_key = False
        self.key = bytearray()
        self.last_key = ""
        self.after_backslash = False
        self.hex_left = 0  # digits of a \uXXXX escape still to come
        self.utf8_left = 0  # continuation bytes of a character still to come
        self.value_tokens = 0  # tokens that started inside the current string value

    @property
    def in_value(self) -> bool:
        return self.in_string and not self.string_is_key

    @property
    def can_close(self) -> bool:
        return self.in_value and not self.after_backslash and self.hex_left == 0 and self.utf8_left == 0

    def feed(self, data: bytes) -> None:
        if self.in_value:
            self.value_tokens += 1
        for byte in data:
            if self.in_string:
                self._string_byte(byte)
            elif byte == _QUOTE:
                self.in_string, self.value_tokens = True, 0
                self.string_is_key = bool(self.containers) and self.containers[-1] == ord("{") and self.expect_key
                self.key.clear()
            elif byte in b"{[":
                self.containers.append(byte)
                self.expect_key = byte == ord("{")
            elif byte in b"}]":
                if self.containers:
                    self.containers.pop()
            elif byte == ord(":"):
                self.expect_key = False
            elif byte == ord(","):
                self.expect_key = bool(self.containers) and self.containers[-1] == ord("{")

    def _string_byte(self, byte: int) -> None:
        if self.hex_left:
            self.hex_left -= 1
        elif self.after_backslash:
            self.after_backslash = False
            self.hex_left = 4 if byte == ord("u") else 0
        elif self.utf8_left and 0x80 <= byte < 0xC0:
            self.utf8_left -= 1
        elif byte == _BACKSLASH:
            self.after_backslash = True
        elif byte == _QUOTE:
            self.in_string = False
            if self.string_is_key:
                self.last_key = self.key.decode("utf-8", "replace")
        else:
            self.utf8_left = 3 if byte >= 0xF0 else 2 if byte >= 0xE0 else 1 if byte >= 0xC0 else 0
        if self.in_string and self.string_is_key:
            self.key.append(byte)


class CaptionConstraint(LogitsProcessor):
    """Masks each row to its grammar; one instance serves one `generate` call."""

    def __init__(self, vocabulary: GrammarVocabulary, grammars: Sequence[CaptionGrammar]):
        self.vocabulary = vocabulary
        self.grammars = list(grammars)
        self.matchers = [vocabulary.matcher(g) for g in self.grammars]
        self.cursors = [JsonCursor() for _ in self.grammars]
        self.done = [False] * len(self.grammars)
        self.broken = [False] * len(self.grammars)
        self.bitmask = llguidance.torch.allocate_token_bitmask(len(self.grammars), vocabulary.vocab_size)
        # llguidance's thread pool pays off for big batches on machines with cores to spare; on a
        # small or busy CPU its hand-offs cost more than the masks (measured: docs/PERFORMANCE.md)
        self.executor = llguidance.LLExecutor() if len(grammars) >= 4 and (os.cpu_count() or 1) >= 8 else None
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._started:
            self._consume(input_ids[:, -1].tolist())
        self._started = True
        active = [(m, i) for i, m in enumerate(self.matchers) if not (self.done[i] or self.broken[i])]
        if self.executor is not None and active:
            llguidance.torch.fill_next_token_bitmask_par(self.executor, active, self.bitmask)
        else:
            for matcher, i in active:
                llguidance.torch.fill_next_token_bitmask(matcher, self.bitmask, i)
        shifts, quote = self.vocabulary.masks_on(scores.device, scores.shape[1])
        allowed = self._unpack(shifts, scores.shape[1])
        for i, cursor in enumerate(self.cursors):
            if self.done[i] or self.broken[i]:
                allowed[i] = True  # finished rows only receive padding; leave their logits alone
            elif cursor.can_close and cursor.value_tokens >= self.grammars[i].tokens_for(cursor.last_key):
                closing = allowed[i] & quote
                if closing.any():
                    allowed[i] = closing
        return scores.masked_fill(~allowed, float("-inf"))

    def _consume(self, tokens: list[int]) -> None:
        for i, token in enumerate(tokens):
            if self.done[i] or self.broken[i]:
                continue
            if token in self.vocabulary.eos_token_ids:
                self.done[i] = True
                continue
            if not self.matchers[i].consume_token(token):
                # never expected: the token came from this row's own mask. Leave the row unconstrained;
                # its output then fails to parse and the caller retries it.
                logger.warning("caption grammar left row %d: %s", i, self.matchers[i].get_error())
                self.broken[i] = True
                continue
            self.cursors[i].feed(self.vocabulary.token_bytes[token])

    def _unpack(self, shifts: torch.Tensor, width: int) -> torch.Tensor:
        """The int32 bitmask (32 tokens a word) as a bool tensor of the logits' width."""
        words = self.bitmask.to(shifts.device, non_blocking=True)
        bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
        if bits.shape[1] >= width:
            return bits[:, :width].clone()
        return torch.nn.functional.pad(bits, (0, width - bits.shape[1]), value=False)
