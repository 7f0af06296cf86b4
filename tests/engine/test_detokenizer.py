"""Streamed text equals the text of all the tokens at once, with characters never split."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.engine.detokenizer import REPLACEMENT, Detokenizer
from app.tiny_checkpoint import build_tokenizer

TOKENIZER = build_tokenizer()


def decode(ids: Sequence[int]) -> str:
    return str(TOKENIZER.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))


def stream(ids: list[int], chunk: int) -> list[str]:
    detokenizer = Detokenizer(decode)
    deltas = [detokenizer.push(ids[start : start + chunk]) for start in range(0, len(ids), chunk)]
    deltas.append(detokenizer.finish(decode(ids)))
    return deltas


@pytest.mark.parametrize(
    "text",
    [
        "Findings: The lungs are clear.\n\nImpression: normal.",
        "Épanchement pleural → gauche, 3 cm² ✓ 🫁 肺",  # characters of 2, 3 and 4 bytes, split across tokens
        "Fractures <box>[[156, 516, 231, 607]]</box><|im_end|>",
    ],
)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_deltas_put_together_are_the_whole_text(text: str, chunk: int) -> None:
    ids = TOKENIZER.encode(text)
    deltas = stream(ids, chunk)
    assert "".join(deltas) == decode(ids)
    assert not any(REPLACEMENT in delta for delta in deltas)


def test_a_split_character_is_held_back_until_it_is_whole() -> None:
    ids = TOKENIZER.encode("🫁")
    assert len(ids) > 1  # a byte-level tokenizer that never saw it: one token per byte
    detokenizer = Detokenizer(decode)
    assert [detokenizer.push([token]) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert detokenizer.push(ids[-1:]) == "🫁"


@given(st.text(max_size=60), st.integers(min_value=1, max_value=4))
def test_any_text_in_any_chunks(text: str, chunk: int) -> None:
    ids = TOKENIZER.encode(text)
    assert "".join(stream(ids, chunk)) == decode(ids)
