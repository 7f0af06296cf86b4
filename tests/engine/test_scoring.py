"""Scoring continuations equals teacher forcing each one through the model's own forward, one at a time."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from app.conversation import Conversation, Turn
from app.engine.request import GenerationOptions, PreparedRequest
from app.engine.runtime import ModelRuntime
from app.engine.scoring import score_continuations
from app.engine.slots import use_slot_attention
from app.settings import Settings
from tests.conftest import rgb_image

LABELS = ("yes", "no", "left lower lobe", "pneumothorax")
TOLERANCE = 1e-4


def teacher_forced_logprob(model: Any, request: PreparedRequest, continuation: Sequence[int]) -> float:
    """The reference: one plain forward of the model over prompt + continuation, as training scores it."""
    features = request.features
    added = torch.tensor([list(continuation)])
    input_ids = torch.cat([features["input_ids"], added], dim=1)
    inputs: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": torch.cat(
            [
                features["mm_token_type_ids"],
                torch.zeros_like(added, dtype=features["mm_token_type_ids"].dtype),
            ],
            dim=1,
        ),
    }
    if "pixel_values" in features:
        inputs["pixel_values"] = features["pixel_values"]
        inputs["image_grid_thw"] = features["image_grid_thw"]
    with torch.inference_mode():
        logits = model(**{key: value.to(model.device) for key, value in inputs.items()}).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    prompt_tokens = request.prompt_tokens
    # The token at position p is predicted by the logits at p - 1.
    predicting = logprobs[prompt_tokens - 1 : prompt_tokens - 1 + len(continuation)]
    return float(predicting.gather(1, added.view(-1, 1).to(model.device)).sum())


def label_continuations(runtime: ModelRuntime, labels: Sequence[str]) -> list[list[int]]:
    """Each label as the model would write it as its whole answer: its tokens, then the end of the turn."""
    tokenizer = runtime.processor.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [[*tokenizer.encode(label, add_special_tokens=False), end_of_turn] for label in labels]


def normalised(logprobs: Sequence[float]) -> list[float]:
    return torch.softmax(torch.tensor(logprobs, dtype=torch.float64), dim=0).tolist()


def requests(runtime: ModelRuntime) -> dict[str, PreparedRequest]:
    options = GenerationOptions(max_new_tokens=1)
    return {
        "image": runtime.prepare(
            Conversation.about(rgb_image(96, 64, seed=5), "Which finding is present?"), options
        ),
        "text": runtime.prepare(
            Conversation((Turn("user", ("Is there a pneumothorax in the left lower lobe?",)),)), options
        ),
    }


@pytest.fixture(scope="module", params=["sdpa", "slot attention"])
def runtime(request: pytest.FixtureRequest, random_checkpoint: Path) -> ModelRuntime:
    loaded = ModelRuntime.load(Settings(model=str(random_checkpoint)))
    if request.param == "slot attention":
        use_slot_attention(loaded.model)
    return loaded


@pytest.mark.parametrize("kind", ["image", "text"])
def test_scores_equal_one_teacher_forced_forward_per_label(runtime: ModelRuntime, kind: str) -> None:
    request = requests(runtime)[kind]
    continuations = label_continuations(runtime, LABELS)
    assert len({len(tokens) for tokens in continuations}) > 1, "the labels should differ in length"

    scores = score_continuations(runtime.model, request, continuations)
    expected = [teacher_forced_logprob(runtime.model, request, tokens) for tokens in continuations]

    assert scores == pytest.approx(expected, abs=TOLERANCE, rel=0)
    assert all(math.isfinite(score) and score < 0 for score in scores)
    probabilities = normalised(scores)
    assert probabilities == pytest.approx(normalised(expected), abs=TOLERANCE, rel=0)
    assert math.fsum(probabilities) == pytest.approx(1.0, abs=1e-12)


def test_a_continuation_scores_the_same_whatever_it_is_batched_with(runtime: ModelRuntime) -> None:
    request = requests(runtime)["image"]
    continuations = label_continuations(runtime, LABELS)
    together = score_continuations(runtime.model, request, continuations)
    alone = [score_continuations(runtime.model, request, [tokens])[0] for tokens in continuations]
    assert together == pytest.approx(alone, abs=TOLERANCE, rel=0)


def test_one_token_continuations_need_no_second_forward(runtime: ModelRuntime) -> None:
    request = requests(runtime)["text"]
    single = [[token] for token in runtime.processor.tokenizer.encode("yes no", add_special_tokens=False)]
    expected = [teacher_forced_logprob(runtime.model, request, tokens) for tokens in single]
    assert score_continuations(runtime.model, request, single) == pytest.approx(
        expected, abs=TOLERANCE, rel=0
    )


def test_nothing_to_score_and_empty_continuations(runtime: ModelRuntime) -> None:
    request = requests(runtime)["text"]
    assert score_continuations(runtime.model, request, []) == ()
    with pytest.raises(ValueError, match="at least one token"):
        score_continuations(runtime.model, request, [[1], []])
