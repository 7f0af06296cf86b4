"""The grammar side of constrained decoding, driven by seeded random walks over the tiny tokenizer.

A walk fills the mask, picks a random allowed token (the end of turn with probability one half whenever it
is allowed, so walks stay short) and accepts it, until it picks the end of turn or nothing else is allowed.
Whatever the walk, the answer text must be a string of the constraint's language.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from app.engine.grammar import (
    BOX_LABEL_MAX_TOKENS,
    CompiledGrammar,
    Constraint,
    ConstraintError,
    GrammarMatcher,
    Grammars,
    MatcherError,
    bitmask_words,
    box_constraint,
    fill_rows,
    integer_range_regex,
    new_bitmask,
)
from app.tasks.base import Reading
from app.tasks.ground import GROUND, extract_boxes
from app.tiny_checkpoint import build_tokenizer

PADDED_VOCAB = 700  # logits rows past the tiny tokenizer's ~560 tokens, as MedMO's 151,936 over 151,643
WALKS = 12


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def end_of_turn(tokenizer: PreTrainedTokenizerFast) -> int:
    token = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(token, int)
    return token


@pytest.fixture(scope="module")
def grammars(tokenizer: PreTrainedTokenizerFast, end_of_turn: int) -> Grammars:
    return Grammars(tokenizer, vocab_size=PADDED_VOCAB, eos_token_ids=[end_of_turn])


def allowed_tokens(bitmask: torch.Tensor, row: int = 0) -> list[int]:
    bits = np.unpackbits(bitmask[row].numpy().view(np.uint8), bitorder="little")
    return [int(token) for token in np.flatnonzero(bits)]


def walk(
    compiled: CompiledGrammar,
    tokenizer: PreTrainedTokenizerFast,
    end_of_turn: int,
    seed: int,
    *,
    max_steps: int = 2000,
) -> str:
    """The answer text of one random walk, which must end with the end of turn."""
    rng = random.Random(seed)
    matcher = compiled.matcher()
    bitmask = new_bitmask(1, PADDED_VOCAB)
    tokens: list[int] = []
    for _ in range(max_steps):
        matcher.fill(bitmask, 0)
        allowed = allowed_tokens(bitmask)
        assert allowed, "a matcher must always allow some token"
        assert max(allowed) < len(tokenizer), "rows past the tokenizer are never allowed"
        others = [token for token in allowed if token != end_of_turn]
        if not others or (end_of_turn in allowed and rng.random() < 0.5):
            matcher.accept(end_of_turn)
            assert matcher.finished
            return str(tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        token = rng.choice(others)
        matcher.accept(token)
        tokens.append(token)
    raise AssertionError(f"the walk did not end in {max_steps} steps")


def walks(grammars: Grammars, constraint: Constraint, tokenizer: Any, end_of_turn: int) -> list[str]:
    compiled = grammars.compile(constraint)
    return [walk(compiled, tokenizer, end_of_turn, seed) for seed in range(WALKS)]


SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "uncertain"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["answer"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "findings": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "label": {"type": "string", "maxLength": 12},
                        "severity": {"type": "integer", "minimum": 1, "maximum": 5},
                    },
                    "required": ["label", "severity"],
                    "additionalProperties": False,
                },
            },
            "urgent": {"type": "boolean"},
        },
        "required": ["findings", "urgent"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "minItems": 2,
        "maxItems": 2,
        "items": {
            "type": "array",
            "minItems": 0,
            "maxItems": 3,
            "items": {"type": "integer", "minimum": -20, "maximum": 300},
        },
    },
    {
        "type": "object",
        "properties": {
            "size_cm": {"type": "number", "minimum": 0.5, "maximum": 12.5},
            "side": {"enum": ["left", "right", "bilateral"]},
            "note": {"type": "string", "maxLength": 8},
            "count": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["side"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "impression": {"type": "string", "maxLength": 20},
            "modality": {"type": "string", "enum": ["CT", "MR", "XR"]},
            "measurements": {
                "type": "array",
                "maxItems": 2,
                "items": {"type": "number", "minimum": -1.5, "maximum": 1.5},
            },
        },
        "required": ["impression", "modality", "measurements"],
        "additionalProperties": False,
    },
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_json_schema_walks_give_valid_json(
    schema: dict[str, Any], grammars: Grammars, tokenizer: Any, end_of_turn: int
) -> None:
    for text in walks(grammars, Constraint.json_schema(schema), tokenizer, end_of_turn):
        jsonschema.validate(json.loads(text), schema)


def test_json_object_walks_give_json_objects(grammars: Grammars, tokenizer: Any, end_of_turn: int) -> None:
    for text in walks(grammars, Constraint.json_object(), tokenizer, end_of_turn):
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    "pattern",
    [
        r"(yes|no)",
        r"[0-9]{1,3}(\.[0-9])? cm",
        r"(left|right) (upper|lower) lobe",
        r"[A-Z][a-z]{0,8}( [a-z]{1,6}){0,2}\.",
    ],
)
def test_regex_walks_fullmatch(pattern: str, grammars: Grammars, tokenizer: Any, end_of_turn: int) -> None:
    for text in walks(grammars, Constraint.regex(pattern), tokenizer, end_of_turn):
        assert re.fullmatch(pattern, text), text


def test_choice_walks_give_one_option(grammars: Grammars, tokenizer: Any, end_of_turn: int) -> None:
    options = ["left", "left lower lobe", "left upper lobe", "right", "none"]
    texts = walks(grammars, Constraint.choice(options), tokenizer, end_of_turn)
    assert set(texts) <= set(options)
    assert len(set(texts)) > 1  # the walks reach several options, prefixes included


def test_equal_choices_are_one_constraint() -> None:
    assert Constraint.choice(["b", "a", "a"]) == Constraint.choice(["a", "b"])
    assert Constraint.json_schema({"b": 1, "type": "object"}) == Constraint.json_schema(
        {"type": "object", "b": 1}
    )
    assert hash(Constraint.regex("a")) == hash(Constraint.regex("a"))


@pytest.mark.parametrize("size", [(64, 64), (640, 480), (96, 1344), (1000, 1000)])
def test_box_walks_parse_into_boxes_inside_the_image(
    size: tuple[int, int], grammars: Grammars, tokenizer: Any, end_of_turn: int
) -> None:
    max_findings = 3
    constraint = box_constraint(size, max_findings=max_findings, none_found=False)
    width, height = size
    for text in walks(grammars, constraint, tokenizer, end_of_turn):
        lines = text.split("\n")
        assert 1 <= len(lines) <= max_findings
        written = text.count("], [") + len(lines)  # boxes as written: one per line, then one per separator
        raw = extract_boxes(text)
        assert len(raw) == written, text
        for box in raw:
            assert box.label, text
            x1, y1, x2, y2 = box.coords
            assert 0 <= min(x1, x2) <= max(x1, x2) <= width
            assert 0 <= min(y1, y2) <= max(y1, y2) <= height
        # The task's own reading: every box placed, unless it has no area (equal corners).
        grounded = GROUND.parse(text, Reading("pixel", size, (2 * width, 2 * height)))
        degenerate = sum(1 for box in raw if box.coords[0] == box.coords[2] or box.coords[1] == box.coords[3])
        assert grounded.dropped == degenerate
        for finding in grounded.findings:
            assert 0 <= finding.box.x_min < finding.box.x_max <= 1
            assert 0 <= finding.box.y_min < finding.box.y_max <= 1


def test_a_box_reply_may_instead_be_one_sentence_without_a_box(
    grammars: Grammars, tokenizer: Any, end_of_turn: int
) -> None:
    constraint = box_constraint((320, 240), max_findings=3)
    texts = list(walks(grammars, constraint, tokenizer, end_of_turn))
    sentences = [text for text in texts if "<box>" not in text]
    assert sentences
    for text in sentences:
        assert "\n" not in text
        assert extract_boxes(text) == []
    # The sentence may end the reply; held to boxes, it is only the start of a label.
    for none_found, may_end in ((True, True), (False, False)):
        matcher = grammars.compile(
            box_constraint((320, 240), max_findings=3, none_found=none_found)
        ).matcher()
        accept_all(matcher, tokenizer.encode("No acute abnormality."))
        mask = new_bitmask(1, grammars.vocab_size)
        matcher.fill(mask, 0)
        assert bool((int(mask[0, end_of_turn // 32]) >> (end_of_turn % 32)) & 1) is may_end


def test_box_replies_the_model_writes_are_in_the_grammar(grammars: Grammars, tokenizer: Any) -> None:
    compiled = grammars.compile(box_constraint((320, 640), max_findings=2))
    reply = "Fractures <box>[[156, 516, 231, 607], [240, 529, 296, 581]]</box>\nPleural effusion <box>[[0, 0, 320, 640]]</box>"
    accept_all(compiled.matcher(), tokenizer.encode(reply))
    too_long = " ".join(["opacity"] * (BOX_LABEL_MAX_TOKENS + 1)) + " <box>"
    for outside in ("Fracture <box>[[321, 0, 1, 1]]</box>", too_long):
        with pytest.raises(MatcherError, match="does not continue"):
            accept_all(compiled.matcher(), tokenizer.encode(outside))


def accept_all(matcher: GrammarMatcher, tokens: list[int]) -> None:
    for token in tokens:
        matcher.accept(token)


@pytest.mark.parametrize(
    ("low", "high"), [(0, 0), (0, 9), (0, 10), (7, 123), (99, 100), (0, 1000), (0, 1344), (13, 2048)]
)
def test_integer_range_regex_matches_exactly_the_range(low: int, high: int) -> None:
    pattern = re.compile(integer_range_regex(low, high))
    assert [n for n in range(2100) if pattern.fullmatch(str(n))] == list(range(low, high + 1))
    assert not pattern.fullmatch("01")
    assert not pattern.fullmatch("-1")


def test_padded_rows_are_never_allowed(grammars: Grammars, tokenizer: Any) -> None:
    bitmask = new_bitmask(3, PADDED_VOCAB)
    assert bitmask.shape == (3, 22)
    assert bitmask_words(PADDED_VOCAB) == 22
    grammars.compile(Constraint.json_object()).matcher().fill(bitmask, 1)
    assert max(allowed_tokens(bitmask, 1)) < len(tokenizer)
    assert len(allowed_tokens(bitmask, 0)) == 22 * 32  # rows it was not asked to fill are left alone


def test_fill_rows_fills_as_each_matcher_would(grammars: Grammars) -> None:
    matchers: list[GrammarMatcher] = [
        grammars.compile(constraint).matcher()
        for constraint in (
            Constraint.json_object(),
            Constraint.regex("[0-9]+"),
            Constraint.choice(["a", "b"]),
        )
    ]
    together, alone = new_bitmask(4, PADDED_VOCAB), new_bitmask(4, PADDED_VOCAB)
    fill_rows(together, [(matcher, row) for row, matcher in zip((3, 0, 2), matchers, strict=True)])
    for row, matcher in zip((3, 0, 2), matchers, strict=True):
        matcher.fill(alone, row)
    assert torch.equal(together, alone)


def test_fill_checks_the_bitmask(grammars: Grammars) -> None:
    matcher = grammars.compile(Constraint.regex("a")).matcher()
    with pytest.raises(ValueError, match="int32"):
        matcher.fill(torch.zeros(1, 22, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="shape"):
        matcher.fill(new_bitmask(1, 32), 0)
    with pytest.raises(IndexError):
        matcher.fill(new_bitmask(1, PADDED_VOCAB), 1)


def test_a_token_outside_the_mask_is_an_error(grammars: Grammars, tokenizer: Any) -> None:
    matcher = grammars.compile(Constraint.choice(["yes", "no"])).matcher()
    with pytest.raises(MatcherError, match="token"):
        matcher.accept(tokenizer.encode("maybe")[0])


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (lambda: Constraint.regex("a(b"), "invalid regex: unclosed group"),
        (lambda: Constraint.regex("[z-a]"), "invalid regex: .*range"),
        (lambda: Constraint.json_schema({"type": "objekt"}), "invalid JSON schema: .*objekt"),
        (lambda: Constraint.json_schema({"$ref": "#/$defs/missing"}), "invalid JSON schema: .*missing"),
        (lambda: Constraint.json_schema({"type": "string", "format": "no-such"}), "Unknown format"),
        (
            lambda: Constraint.json_schema({"type": "string", "pattern": "(x"}),
            "invalid JSON schema: unclosed",
        ),
        (lambda: Constraint.json_schema({"x": float("nan")}), "not JSON"),
        (lambda: Constraint.grammar("start: undefined_rule"), "invalid grammar: .*undefined_rule"),
        (lambda: Constraint.choice([]), "at least one option"),
        (lambda: Constraint.choice("yes"), "list of strings"),
        (lambda: Constraint.regex("a" * 100_001), "at most 100000"),
    ],
)
def test_refused_constraints_say_why(constraint: Any, message: str, grammars: Grammars) -> None:
    with pytest.raises(ConstraintError, match=message):
        grammars.compile(constraint())


def test_the_cache_compiles_each_constraint_once(tokenizer: Any, end_of_turn: int) -> None:
    grammars = Grammars(tokenizer, vocab_size=PADDED_VOCAB, eos_token_ids=[end_of_turn], cache_size=2)
    first = grammars.compile(Constraint.regex("a+"))
    assert grammars.compile(Constraint.regex("a+")) is first
    grammars.compile(Constraint.regex("b+"))
    grammars.compile(Constraint.regex("a+"))  # the most recently used now: "b+" goes first
    grammars.compile(Constraint.regex("c+"))
    assert grammars.compilations == 3
    assert grammars.compile(Constraint.regex("a+")) is first
    grammars.compile(Constraint.regex("b+"))
    assert grammars.compilations == 4
    with pytest.raises(ConstraintError):
        grammars.compile(Constraint.regex("("))
    with pytest.raises(ConstraintError):
        grammars.compile(Constraint.regex("("))  # a refusal is not cached


def test_concurrent_compiles_share_one_compile(tokenizer: Any, end_of_turn: int) -> None:
    grammars = Grammars(tokenizer, vocab_size=PADDED_VOCAB, eos_token_ids=[end_of_turn])
    constraints = [Constraint.json_schema(schema) for schema in SCHEMAS] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        compiled = list(pool.map(grammars.compile, constraints))
    assert grammars.compilations == len(SCHEMAS)
    assert len({id(grammar) for grammar in compiled}) == len(SCHEMAS)
    text = walk(compiled[-1], tokenizer, end_of_turn, seed=0)
    jsonschema.validate(json.loads(text), SCHEMAS[-1])


def test_grammars_refuse_a_vocabulary_narrower_than_the_tokenizer(tokenizer: Any, end_of_turn: int) -> None:
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        Grammars(tokenizer, vocab_size=100, eos_token_ids=[end_of_turn])
    with pytest.raises(ValueError, match="end-of-turn"):
        Grammars(tokenizer, vocab_size=PADDED_VOCAB, eos_token_ids=[])
