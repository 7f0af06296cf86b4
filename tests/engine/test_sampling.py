"""Sampling, penalties and log-probabilities in both engines, held to the model's own distribution.

Every request here runs on the real runtime (float32, CPU). Seeds are fixed, so each test is deterministic:
the goodness-of-fit test draws the same 2,000 tokens every time.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
import torch
from scipy.stats import chisquare

from app.conversation import Conversation
from app.engine.grammar import Constraint
from app.engine.protocol import complete
from app.engine.request import Generation, GenerationOptions, PreparedRequest, Sampling
from app.engine.runtime import ModelRuntime
from app.settings import Settings
from tests.conftest import rgb_image
from tests.engine.test_continuous import run, running

PROMPTS = [
    "Is there a pleural effusion?",
    "Describe the heart size.",
    "Any fracture?",
    "What is the modality?",
]


@pytest.fixture(scope="module")
def runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint), device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def sharp_runtime(random_checkpoint: Path) -> ModelRuntime:
    """The random model with its output layer scaled up: random weights give a nearly uniform softmax, on
    which any sampler passes a goodness-of-fit test; this one's distribution has a shape to get wrong."""
    sharp = ModelRuntime.load(Settings(model=str(random_checkpoint), device="cpu", dtype="float32"))
    with torch.no_grad():
        sharp.model.lm_head.weight.mul_(8.0)
    return sharp


def prepare(runtime: ModelRuntime, index: int, options: GenerationOptions) -> PreparedRequest:
    picture = rgb_image(64 + 32 * (index % 3), 96, seed=index)
    return runtime.prepare(Conversation.about(picture, PROMPTS[index % len(PROMPTS)]), options)


def sampled(seed: int, **rules: float) -> Sampling:
    return Sampling(**{"temperature": 0.9, "top_p": 0.95, "seed": seed, **rules})  # type: ignore[arg-type]


def first_token_logits(runtime: ModelRuntime, request: PreparedRequest) -> torch.Tensor:
    """The model's logits for the first answer token: one plain forward of the prompt."""
    features = {key: value.to(runtime.model.device) for key, value in request.features.items()}
    with torch.inference_mode():
        return runtime.model(**features).logits[0, -1].double()


async def draws(runtime: ModelRuntime, request: PreparedRequest, seeds: range, **rules: float) -> list[int]:
    """The first token of `request` under each seed, through the continuous engine: the requests share
    the prompt (one prepared request), so each prefill computes it once for all its slots."""
    tokens: list[int] = []
    async with running(runtime, slots=64, context=1024) as (engine, _):
        for start in range(0, len(seeds), 64):  # the queue holds 64
            wave = [
                replace(
                    request,
                    options=GenerationOptions(1, sampling=Sampling(seed=seed, **rules)),  # type: ignore[arg-type]
                )
                for seed in seeds[start : start + 64]
            ]
            results = await asyncio.gather(*(run(engine, item) for item in wave))
            tokens.extend(result.generation.token_ids[0] for result in results)
    return tokens


async def test_a_seeded_request_writes_the_same_alone_and_among_16_others_in_both_engines(
    runtime: ModelRuntime,
) -> None:
    target = prepare(runtime, 0, GenerationOptions(16, sampling=sampled(1234)))
    others = [
        prepare(
            runtime,
            index,
            GenerationOptions(4 + index, sampling=sampled(index) if index % 3 else Sampling()),
        )
        for index in range(1, 17)
    ]
    async with running(runtime, slots=8) as (engine, runner):
        alone = [(await run(engine, target)).generation for _ in range(5)]
        batched = []
        for _ in range(5):
            results = await asyncio.gather(
                *(run(engine, item) for item in [*others[:8], target, *others[8:]])
            )
            batched.append(results[8].generation)
    assert max(runner.decodes) == 8  # it really ran among others, and joined a running batch
    assert len({generation.token_ids for generation in alone + batched}) == 1
    assert len(alone[0].token_ids) == 16

    reference_alone = [runtime.generate([target])[0] for _ in range(5)]
    reference_batched = [runtime.generate([*others[:8], target, *others[8:]])[8] for _ in range(2)]
    assert len({generation.token_ids for generation in reference_alone + reference_batched}) == 1
    # Another seed writes another answer.
    reseeded = prepare(runtime, 0, GenerationOptions(16, sampling=sampled(4321)))
    assert runtime.generate([reseeded])[0].token_ids != reference_alone[0].token_ids


async def test_greedy_requests_keep_their_tokens_among_sampled_and_penalised_ones(
    runtime: ModelRuntime,
) -> None:
    greedy = [prepare(runtime, index, GenerationOptions(12)) for index in range(3)]
    ruled = [
        prepare(runtime, 3, GenerationOptions(12, sampling=sampled(7))),
        prepare(runtime, 4, GenerationOptions(12, sampling=Sampling(repetition_penalty=1.5))),
        prepare(runtime, 5, GenerationOptions(12, logprobs=3)),
        runtime.constrained(prepare(runtime, 6, GenerationOptions(12)), Constraint.choice(["left", "right"])),
    ]
    async with running(runtime, slots=6) as (engine, _):
        results = await asyncio.gather(*(run(engine, item) for item in [ruled[0], *greedy, *ruled[1:]]))
    assert [result.generation for result in results[1:4]] == [runtime.generate([item])[0] for item in greedy]
    assert runtime.generate([*greedy, *ruled])[:3] == [runtime.generate([item])[0] for item in greedy]


def goodness_of_fit(tokens: list[int], expected: torch.Tensor) -> float:
    """Chi-square's p-value for the draws against a distribution, over bins of at least 5 expected draws
    each (the test's condition): tokens merged in order of probability."""
    draws = len(tokens)
    counts = torch.bincount(torch.tensor(tokens), minlength=expected.numel()).double()
    observed_bins, expected_bins = [0.0], [0.0]
    for token in expected.argsort(descending=True).tolist():
        if expected_bins[-1] >= 5 / draws:
            observed_bins.append(0.0)
            expected_bins.append(0.0)
        observed_bins[-1] += float(counts[token])
        expected_bins[-1] += float(expected[token])
    if expected_bins[-1] < 5 / draws:  # the remainder joins the bin before it
        observed, expected_mass = observed_bins.pop(), expected_bins.pop()
        observed_bins[-1] += observed
        expected_bins[-1] += expected_mass
    assert len(observed_bins) > 20
    total = sum(expected_bins)
    return float(chisquare(observed_bins, [draws * mass / total for mass in expected_bins]).pvalue)


async def test_a_constrained_answer_is_the_same_in_both_engines_and_in_its_language(
    runtime: ModelRuntime,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "side": {"enum": ["left", "right", "bilateral"]},
            "size_mm": {"type": "integer", "minimum": 0, "maximum": 300},
            "urgent": {"type": "boolean"},
        },
        "required": ["side", "size_mm", "urgent"],
        "additionalProperties": False,
    }
    requests = [
        runtime.constrained(prepare(runtime, index, GenerationOptions(64, sampling=sampling)), constraint)
        for index, (sampling, constraint) in enumerate(
            [
                (Sampling(), Constraint.json_schema(schema)),
                (sampled(3), Constraint.json_schema(schema)),
                (Sampling(), Constraint.regex(r"(yes|no), [0-9]{1,2}%")),
                (sampled(5), Constraint.choice(["pleural effusion", "pneumothorax", "normal"])),
            ]
        )
    ]
    async with running(runtime, slots=4) as (engine, _):
        continuous = await asyncio.gather(*(run(engine, request) for request in requests))
    reference = runtime.generate(requests)
    assert [result.generation for result in continuous] == reference
    for generation in reference:
        assert generation.finish_reason == "stop"
    jsonschema.validate(json.loads(reference[0].text), schema)
    jsonschema.validate(json.loads(reference[1].text), schema)
    assert re.fullmatch(r"(yes|no), [0-9]{1,2}%", reference[2].text)
    assert reference[3].text in {"pleural effusion", "pneumothorax", "normal"}


async def test_the_first_token_over_2000_draws_follows_the_models_softmax(
    sharp_runtime: ModelRuntime,
) -> None:
    request = prepare(sharp_runtime, 0, GenerationOptions(1))
    logits = first_token_logits(sharp_runtime, request)
    tokens = await draws(sharp_runtime, request, range(2000), temperature=1.0)
    assert goodness_of_fit(tokens, logits.softmax(-1)) > 0.01
    # The test tells distributions apart: the same draws do not fit the softmax at another temperature,
    # and draws at temperature 0.7 fit that one.
    assert goodness_of_fit(tokens, (logits / 0.7).softmax(-1)) < 1e-6
    cooler = await draws(sharp_runtime, request, range(2000, 4000), temperature=0.7)
    assert goodness_of_fit(cooler, (logits / 0.7).softmax(-1)) > 0.01


async def test_top_k_and_top_p_leave_out_what_they_must(sharp_runtime: ModelRuntime) -> None:
    runtime = sharp_runtime
    request = prepare(runtime, 1, GenerationOptions(1))
    probabilities = first_token_logits(runtime, request).softmax(-1)
    ranked = probabilities.argsort(descending=True).tolist()
    top_k = await draws(runtime, request, range(300), temperature=1.0, top_k=5)
    assert set(top_k) <= set(ranked[:5])
    assert len(set(top_k)) == 5
    # top_p = 0.3: the smallest set of most likely tokens holding 30% of the probability.
    mass = probabilities[ranked].cumsum(0)
    nucleus = set(ranked[: int((mass < 0.3).sum()) + 1])
    assert len(nucleus) > 5
    top_p = await draws(runtime, request, range(300), temperature=1.0, top_p=0.3)
    assert set(top_p) <= nucleus
    assert len(set(top_p)) > len(nucleus) // 2
    # Without them, the draws go well beyond both sets.
    free = await draws(runtime, request, range(300), temperature=1.0)
    assert len(set(free) - nucleus) > 5


async def test_the_repetition_penalty_is_transformers_own(runtime: ModelRuntime) -> None:
    request = prepare(runtime, 2, GenerationOptions(24, sampling=Sampling(repetition_penalty=1.3)))
    features = {key: value for key, value in request.features.items()}
    with torch.inference_mode():
        output = runtime.model.generate(
            **features, do_sample=False, max_new_tokens=24, repetition_penalty=1.3, eos_token_id=[-1]
        )
    expected = output[0, request.prompt_tokens :].tolist()
    async with running(runtime) as (engine, _):
        continuous = (await run(engine, request.limited_to(24))).generation
    plain = runtime.generate([replace(request, options=GenerationOptions(24))])[0]
    reference = runtime.generate([request])[0]
    stopped = next((n + 1 for n, token in enumerate(expected) if token in runtime.eos_token_ids), 24)
    assert list(continuous.token_ids) == list(reference.token_ids) == expected[:stopped]
    assert plain.token_ids != reference.token_ids  # the penalty changed the answer


async def test_log_probabilities_are_the_models_own_in_both_engines(runtime: ModelRuntime) -> None:
    request = prepare(runtime, 3, GenerationOptions(10, logprobs=5))
    async with running(runtime) as (engine, _):
        continuous = (await run(engine, request)).generation
    reference = runtime.generate([request])[0]
    for generation in (continuous, reference):
        assert generation.logprobs is not None
        assert len(generation.logprobs) == len(generation.token_ids)
        check_logprobs(runtime, request, generation)
    assert continuous.token_ids == reference.token_ids


def check_logprobs(runtime: ModelRuntime, request: PreparedRequest, generation: Generation) -> None:
    """Each token's log-probability and alternatives equal a teacher-forced forward of the plain model."""
    assert generation.logprobs is not None
    features = dict(request.features)
    answer = torch.tensor([generation.token_ids[:-1]], dtype=torch.long)
    features["input_ids"] = torch.cat([features["input_ids"], answer], dim=1)
    features["attention_mask"] = torch.ones_like(features["input_ids"])
    features["mm_token_type_ids"] = torch.cat(
        [features["mm_token_type_ids"], torch.zeros_like(answer)], dim=1
    )
    with torch.inference_mode():
        logits = runtime.model(**features).logits[0, request.prompt_tokens - 1 :].float()
    expected = logits.log_softmax(-1)
    for step, (token, taken) in enumerate(zip(generation.token_ids, generation.logprobs, strict=True)):
        assert taken.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        assert [token_id for token_id, _ in taken.top] == expected[step].topk(5).indices.tolist()
        assert [value for _, value in taken.top] == pytest.approx(
            expected[step].topk(5).values.tolist(), abs=1e-4
        )
        assert taken.top[0][0] == token  # greedy: the chosen token is the most likely


async def test_n_choices_of_one_prompt_share_its_prefill(runtime: ModelRuntime) -> None:
    request = prepare(runtime, 0, GenerationOptions(12))
    choices = [replace(request, options=GenerationOptions(12, sampling=sampled(seed))) for seed in (1, 2, 3)]
    async with running(runtime, slots=4) as (engine, runner):
        before = runner.inner.prompt_tokens_computed
        with engine.admit() as first, engine.admit() as second, engine.admit() as third:
            deadline = time.monotonic() + 60
            results = await asyncio.gather(
                *(
                    complete(engine, admission, choice, deadline_s=deadline)
                    for admission, choice in zip((first, second, third), choices, strict=True)
                )
            )
        assert runner.inner.prompt_tokens_computed - before == request.prompt_tokens
        # Each choice is what its request writes alone, with a prompt of its own.
        for choice, result in zip(choices, results, strict=True):
            alone = prepare(runtime, 0, choice.options)
            assert (await run(engine, alone)).generation == result.generation
    assert len({result.generation.token_ids for result in results}) == 3


async def test_a_checkpoints_own_generation_settings_do_not_change_greedy_answers(
    random_checkpoint: Path,
) -> None:
    # Qwen-family checkpoints ship generation_config.json with sampling settings and sometimes a repetition
    # penalty; the reference path must stay the plain argmax the continuous engine takes.
    runtime = ModelRuntime.load(Settings(model=str(random_checkpoint), device="cpu", dtype="float32"))
    runtime.model.generation_config.repetition_penalty = 1.3
    runtime.model.generation_config.no_repeat_ngram_size = 2
    request = prepare(runtime, 2, GenerationOptions(24))
    async with running(runtime) as (engine, _):
        continuous = (await run(engine, request)).generation
    assert runtime.generate([request])[0] == continuous
