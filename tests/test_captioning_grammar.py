"""The caption grammar and its token bound, driven without a model: random and adversarial logits go
through CaptionConstraint exactly as transformers' generate would pass them, on a byte tokenizer and
on a BPE tokenizer whose tokens straddle JSON's structure (`":"`, `","`, `"}`)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tailoredgen_train.captioning.cleaning import clean_vlm_output
from tailoredgen_train.captioning.constrained import CaptionConstraint, GrammarVocabulary, JsonCursor
from tailoredgen_train.captioning.grammar import CaptionGrammar, CaptionLimits, caption_grammar, text_grammar
from tailoredgen_train.data import SAMPLE_DATASET_DIR
from tailoredgen_train.data.caption_format import unknown_fields
from tailoredgen_train.errors import CaptionInputError
from tailoredgen_train.fixtures.tiny_vlm import build_tokenizer

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def byte_vocab() -> GrammarVocabulary:
    tokenizer = build_tokenizer()
    return GrammarVocabulary(tokenizer, len(tokenizer), [tokenizer.convert_tokens_to_ids(EOS)])


@pytest.fixture(scope="module")
def bpe_vocab() -> GrammarVocabulary:
    """A byte-level BPE trained on the sample captions: multi-byte tokens such as '":"' and '","'."""
    corpus = [json.loads(line)["caption"] for line in (SAMPLE_DATASET_DIR / "metadata.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=700, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    vocabulary = GrammarVocabulary(fast, len(fast), [fast.eos_token_id])
    assert any(b.startswith(b'"') and len(b) > 2 for b in vocabulary.token_bytes)  # the straddling tokens exist
    return vocabulary


def drive(vocabulary: GrammarVocabulary, grammar: CaptionGrammar, rows: int, *, seed: int, avoid_quotes: float,
          max_steps: int | None = None) -> list[tuple[list[int], bool]]:
    """What generate does with CaptionConstraint: mask, sample, append; stop a row at EOS.

    `avoid_quotes` pushes the logits of tokens containing a quote down: an adversarial model that
    keeps every string open as long as it may. Returns each row's tokens and whether it ended."""
    torch.manual_seed(seed)
    constraint = CaptionConstraint(vocabulary, [grammar] * rows)
    width = vocabulary.vocab_size + 5  # logits wider than the vocabulary, as padded embeddings make them
    bias = torch.tensor([-avoid_quotes * (b'"' in b) for b in vocabulary.token_bytes] + [0.0] * 5)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    finished = [False] * rows
    out: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(max_steps or grammar.token_bound()):
        scores = constraint(ids, torch.randn(rows, width) * 3 + bias)
        assert torch.isfinite(scores).any(dim=1).all()  # every row keeps something to sample
        probabilities = torch.softmax(scores, dim=1)
        tokens = torch.multinomial(probabilities, 1)[:, 0]
        for row, token in enumerate(tokens.tolist()):
            if finished[row]:
                tokens[row] = 0  # padding after the end, as generate does
                continue
            out[row].append(token)
            finished[row] = token in vocabulary.eos_token_ids
        ids = torch.cat([ids, tokens[:, None]], dim=1)
        if all(finished):
            break
    return [(tokens, done) for tokens, done in zip(out, finished)]


def text_of(vocabulary: GrammarVocabulary, tokens: list[int]) -> str:
    return b"".join(vocabulary.token_bytes[t] for t in tokens).decode("utf-8")


@pytest.mark.parametrize("vocab_name", ["byte_vocab", "bpe_vocab"])
@pytest.mark.parametrize("avoid_quotes", [0.0, 8.0])
def test_every_caption_closes_within_the_bound_and_has_only_known_fields(request, vocab_name, avoid_quotes):
    vocabulary = request.getfixturevalue(vocab_name)
    grammar = caption_grammar(CaptionLimits.uniform(3, max_objects=2, max_text_renders=1))
    bound = grammar.token_bound()
    for tokens, finished in drive(vocabulary, grammar, rows=4, seed=1, avoid_quotes=avoid_quotes):
        assert finished and len(tokens) <= bound
        caption = json.loads(clean_vlm_output(text_of(vocabulary, tokens[:-1])))
        assert unknown_fields(caption) == []
        assert {"short_description", "background_setting", "context"} <= set(caption)  # required ones


def test_without_the_string_allowance_an_adversarial_model_runs_past_the_bound(byte_vocab):
    # the negative control: the same grammar with allowances too large to ever apply
    limits = CaptionLimits.uniform(3, max_objects=2, max_text_renders=1)
    grammar = caption_grammar(limits)
    unbounded = CaptionGrammar(grammar.schema, {}, 10**9)
    rows = drive(byte_vocab, unbounded, rows=4, seed=1, avoid_quotes=8.0, max_steps=grammar.token_bound())
    assert not any(finished for _, finished in rows)


def test_the_bound_is_reached_by_the_worst_case(byte_vocab):
    # with one-byte tokens, quotes avoided and every optional field likely taken, outputs come close to
    # the bound: it is tight enough to be worth having, and never exceeded
    grammar = caption_grammar(CaptionLimits.uniform(2, max_objects=1, max_text_renders=1))
    lengths = [len(t) for t, _ in drive(byte_vocab, grammar, rows=6, seed=3, avoid_quotes=8.0)]
    assert max(lengths) <= grammar.token_bound()
    assert max(lengths) > grammar.token_bound() // 3


def test_the_default_limits_fit_fibos_captions():
    grammar = caption_grammar(CaptionLimits())
    assert 4096 < grammar.token_bound() < 10_000  # FIBO's VLM stops at 4096; our bound is the guaranteed one
    assert grammar.schema["properties"]["objects"]["maxItems"] == 5


def test_a_text_caption_continues_the_prefix(byte_vocab, bpe_vocab):
    prefix = 'A (flat) 3.5" [vector] illustration of'
    grammar = text_grammar(CaptionLimits.uniform(6), prefix)
    for vocabulary in (byte_vocab, bpe_vocab):
        for tokens, finished in drive(vocabulary, grammar, rows=3, seed=2, avoid_quotes=0.0):
            description = json.loads(text_of(vocabulary, tokens[:-1]))["short_description"]
            assert finished and description.startswith(prefix + " ") and not description[len(prefix) + 1].isspace()


def test_a_visual_schema_fixes_values(byte_vocab):
    schema = {"style_medium": "digital illustration", "lighting": {"conditions": "flat studio light"},
              "aesthetics": {"aesthetic_score": "high"}}
    grammar = caption_grammar(CaptionLimits.uniform(2), schema)
    for tokens, _ in drive(byte_vocab, grammar, rows=3, seed=4, avoid_quotes=0.0):
        caption = json.loads(text_of(byte_vocab, tokens[:-1]))
        assert caption["style_medium"] == "digital illustration"
        assert caption["lighting"]["conditions"] == "flat studio light"
        assert caption["aesthetics"]["aesthetic_score"] == "high"


@pytest.mark.parametrize(("schema", "message"), [
    ({"lightning": {"conditions": "x"}}, "lightning"),
    ({"lighting": {"brightness": "x"}}, "lighting.brightness"),
    ({"objects": [{"description": "a bear"}]}, "objects must be absent"),
    ({"aesthetics": {"aesthetic_score": "great"}}, "must be one of"),
    ({"style_medium": ""}, "non-empty string"),
])
def test_bad_visual_schemas_are_refused(schema, message):
    with pytest.raises(CaptionInputError, match=message):
        caption_grammar(CaptionLimits(), schema)


def test_the_cursor_tracks_keys_values_escapes_and_characters():
    cursor = JsonCursor()
    cursor.feed(b'{"short_description":"a\\')
    assert cursor.in_value and cursor.last_key == "short_description" and not cursor.can_close  # mid-escape
    cursor.feed(b'"b\xc3')
    assert not cursor.can_close  # mid-character
    cursor.feed(b'\xa9')
    assert cursor.can_close and cursor.value_tokens == 2
    cursor.feed(b'","objects":[{"description":"')
    assert cursor.in_value and cursor.last_key == "description" and cursor.value_tokens == 0
    cursor.feed(b'x"}],"lighting":{')
    assert not cursor.in_string and cursor.expect_key
