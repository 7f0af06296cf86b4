"""Sampling, n choices, logprobs and response_format on the chat route, called with the real `openai`
package against the real app on the random-weight tiny checkpoint, for both engines."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionTokenLogprob
from pydantic import BaseModel, Field, ValidationError

from app.engine.runtime import ModelRuntime
from app.main import create_app
from app.settings import Settings
from tests.conftest import settings_for

ENGINES = ["continuous", "generate"]
QUESTION = [{"role": "user", "content": "Is there a pleural effusion?"}]


@pytest.fixture(scope="module")
def runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint)))


def settings(checkpoint: Path, engine: str) -> Settings:
    return settings_for(checkpoint, engine=engine, max_slots=16 if engine == "continuous" else None)


@pytest.fixture(scope="module", params=ENGINES)
def client(
    request: pytest.FixtureRequest, runtime: ModelRuntime, random_checkpoint: Path
) -> Iterator[openai.OpenAI]:
    application = create_app(settings(random_checkpoint, request.param), runtime=runtime)
    with TestClient(application) as http:
        yield openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def text_of(completion: Any, index: int = 0) -> str:
    content = completion.choices[index].message.content
    assert isinstance(content, str)
    return content


def spelled(tokens: list[ChatCompletionTokenLogprob]) -> str:
    """The text the tokens' bytes make together."""
    return bytes(byte for token in tokens for byte in token.bytes or []).decode(errors="replace")


# --- sampling ---


def test_a_seeded_sample_is_the_same_every_time_and_another_seed_differs(
    client: openai.OpenAI, model: str
) -> None:
    def sampled(seed: int) -> str:
        return text_of(
            client.chat.completions.create(
                model=model, messages=QUESTION, max_tokens=16, temperature=0.7, seed=seed
            )
        )

    assert sampled(1234) == sampled(1234)
    assert sampled(4321) != sampled(1234)
    # The largest and smallest 64-bit seeds are taken too.
    assert sampled(2**64 - 1) == sampled(2**64 - 1)
    assert sampled(-(2**63)) == sampled(-(2**63))


def test_greedy_stays_the_default_and_ignores_what_only_sampling_uses(
    client: openai.OpenAI, model: str
) -> None:
    plain = text_of(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16))
    zero = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        top_p=0.5,
        seed=7,
        extra_body={"top_k": 3},
    )
    assert text_of(zero) == plain
    sampled = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16, temperature=1.0)
    assert text_of(sampled) != plain  # a seed drawn by the server: gibberish of another kind


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_answer(client: openai.OpenAI, model: str) -> None:
    greedy = text_of(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16))
    top_k = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=1.5, seed=3, extra_body={"top_k": 1}
    )
    top_p = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, temperature=1.5, seed=3, top_p=1e-6
    )
    assert text_of(top_k) == greedy
    assert text_of(top_p) == greedy


def test_a_repetition_penalty_changes_a_greedy_answer(client: openai.OpenAI, model: str) -> None:
    greedy = text_of(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=32))
    penalised = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=32, extra_body={"repetition_penalty": 2.0}
    )
    assert text_of(penalised) != greedy


# --- n choices ---


def test_n_choices_each_sampled_with_the_next_seed(client: openai.OpenAI, model: str) -> None:
    three = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0.9, seed=11, n=3
    )
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    texts = [text_of(three, index) for index in range(3)]
    assert len(set(texts)) > 1
    one = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=8, temperature=0.9, seed=12
    )
    assert texts[1] == text_of(one)  # choice k is the answer seed + k gives alone
    assert three.usage is not None
    assert one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt, counted once
    assert three.usage.completion_tokens == 3 * 8  # random weights never end a turn: 8 tokens each
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens
    assert all(choice.finish_reason == "length" for choice in three.choices)


def test_n_choices_streamed_side_by_side(client: openai.OpenAI, model: str) -> None:
    arguments: dict[str, Any] = {
        "model": model,
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0.9,
        "seed": 11,
        "n": 3,
    }
    whole = client.chat.completions.create(**arguments)
    chunks = list(
        client.chat.completions.create(**arguments, stream=True, stream_options={"include_usage": True})
    )
    texts = ["", "", ""]
    finished: dict[int, str | None] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        assert choice.index not in finished, "a chunk after its choice's finish_reason"
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason is not None:
            finished[choice.index] = choice.finish_reason
    assert texts == [text_of(whole, index) for index in range(3)]
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1].usage == whole.usage


def test_stop_sequences_end_each_choice_on_its_own(client: openai.OpenAI, model: str) -> None:
    arguments: dict[str, Any] = {"model": model, "messages": QUESTION, "max_tokens": 24, "temperature": 1.0}
    free = client.chat.completions.create(**arguments, seed=5, n=3)
    texts = [text_of(free, index) for index in range(3)]
    stop = texts[0][4:6]  # two characters the first answer writes
    stopped = client.chat.completions.create(**arguments, seed=5, n=3, stop=[stop])
    for index, text in enumerate(texts):
        expected = text[: text.find(stop)] if stop in text else text
        assert text_of(stopped, index) == expected
        assert stopped.choices[index].finish_reason == ("stop" if stop in text else "length")


def test_more_choices_than_the_server_allows_are_refused_naming_n(client: openai.OpenAI, model: str) -> None:
    for n in (5, 17):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, n=n)
        assert str(refused.value.body["message"]).startswith("n: ")  # type: ignore[index]


def test_max_n_is_held_within_the_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMO_MAX_QUEUE", "2")
    monkeypatch.setenv("MEDMO_MAX_IMAGES", "1")
    assert Settings().most_choices == 2  # the default, lowered to what the queue holds
    monkeypatch.setenv("MEDMO_MAX_N", "4")
    with pytest.raises(ValidationError, match=r"MEDMO_MAX_QUEUE \(2\) is smaller than MEDMO_MAX_N \(4\)"):
        Settings()


# --- logprobs ---


def test_logprobs_of_a_greedy_answer(client: openai.OpenAI, model: str) -> None:
    completion = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=12, logprobs=True, top_logprobs=5
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None
    tokens = choice.logprobs.content
    assert tokens is not None
    assert choice.logprobs.refusal is None
    assert completion.usage is not None
    assert len(tokens) == completion.usage.completion_tokens == 12  # no end of turn: each token is there
    for token in tokens:
        assert token.logprob <= 0
        assert [other.logprob for other in token.top_logprobs] == sorted(
            (other.logprob for other in token.top_logprobs), reverse=True
        )
        assert len(token.top_logprobs) == 5
        assert token.logprob == token.top_logprobs[0].logprob  # greedy takes the most likely
        assert token.token == token.top_logprobs[0].token
        assert token.bytes is not None
        if "\ufffd" not in token.token:
            assert bytes(token.bytes).decode() == token.token
    assert spelled(tokens) == text_of(completion)


def test_logprobs_without_alternatives_and_streamed(client: openai.OpenAI, model: str) -> None:
    arguments: dict[str, Any] = {"model": model, "messages": QUESTION, "max_tokens": 12, "logprobs": True}
    whole = client.chat.completions.create(**arguments, top_logprobs=3)
    chunks = list(client.chat.completions.create(**arguments, top_logprobs=3, stream=True))
    streamed = [
        token
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs is not None
        for token in choice.logprobs.content or []
    ]
    assert whole.choices[0].logprobs is not None
    assert streamed == whole.choices[0].logprobs.content
    bare = client.chat.completions.create(**arguments)
    assert bare.choices[0].logprobs is not None
    assert bare.choices[0].logprobs.content is not None
    assert [token.top_logprobs for token in bare.choices[0].logprobs.content] == [[]] * 12
    assert (
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4).choices[0].logprobs
        is None
    )


def test_logprobs_leave_out_the_end_of_the_turn_and_what_a_stop_sequence_cuts(
    client: openai.OpenAI, model: str
) -> None:
    answer_format: Any = {"type": "json_schema", "json_schema": {"name": "yes_no", "schema": YES_NO}}
    ended = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=64, logprobs=True, response_format=answer_format
    )
    assert ended.choices[0].finish_reason == "stop"
    assert ended.choices[0].logprobs is not None
    tokens = ended.choices[0].logprobs.content
    assert tokens is not None
    assert ended.usage is not None
    assert len(tokens) == ended.usage.completion_tokens - 1
    assert spelled(tokens) == text_of(ended)
    # A stop sequence in the middle of the answer: the tokens from the one it begins in on are not there.
    cut = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=64,
        logprobs=True,
        response_format=answer_format,
        stop=['": '],
    )
    assert text_of(cut) == '{"answer'
    assert cut.choices[0].logprobs is not None
    kept = cut.choices[0].logprobs.content
    assert kept is not None
    assert kept == tokens[: len(kept)]
    assert spelled(kept).startswith(text_of(cut))
    assert len(spelled(kept[:-1])) < len(text_of(cut))  # the last kept is the one the stop begins in


# --- response_format ---

YES_NO = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "reason": {"type": "string", "maxLength": 30},
    },
    "required": ["answer", "reason"],
    "additionalProperties": False,
}


class Finding(BaseModel):
    finding: Literal["effusion", "pneumothorax", "nodule", "none"]
    present: bool
    size_mm: int = Field(ge=0, le=300)
    note: str = Field(max_length=40)


def test_a_json_schema_answer_whole_and_streamed(client: openai.OpenAI, model: str) -> None:
    answer_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "yes_no", "schema": YES_NO, "strict": True},
    }
    for seed in (None, 1, 2):
        sampling: dict[str, Any] = {} if seed is None else {"temperature": 1.0, "seed": seed}
        whole = client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=128, response_format=answer_format, **sampling
        )
        assert whole.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(text_of(whole)), YES_NO)
        streamed = client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=128,
            response_format=answer_format,
            stream=True,
            **sampling,
        )
        assert "".join(
            chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices
        ) == text_of(whole)


def test_the_sdks_parse_with_a_pydantic_model(client: openai.OpenAI, model: str) -> None:
    parsed = client.chat.completions.parse(
        model=model, messages=QUESTION, max_tokens=128, response_format=Finding
    )
    finding = parsed.choices[0].message.parsed
    assert isinstance(finding, Finding)
    assert parsed.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text_of(parsed)), Finding.model_json_schema())
    with client.chat.completions.stream(
        model=model, messages=QUESTION, max_tokens=128, response_format=Finding, temperature=1.0, seed=9
    ) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Finding)


def test_a_json_object_answer(client: openai.OpenAI, model: str) -> None:
    # Any object may hold strings and numbers of any length: the random model runs some to max_tokens.
    answers = [
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            max_tokens=256,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
        )
        for seed in range(6)
    ]
    ended = [answer for answer in answers if answer.choices[0].finish_reason == "stop"]
    assert ended
    assert all(isinstance(json.loads(text_of(answer)), dict) for answer in ended)
    assert all(text_of(answer).startswith("{") for answer in answers)
    text = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, response_format={"type": "text"}
    )
    assert text_of(text) == text_of(
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=16)
    )


# The acceptance bar: under a model that wants to write gibberish, every schema answer ends and validates.
# Each schema's grammar is finite: enums, booleans, integers and numbers within bounds (a number's fraction
# is written with at most six decimals), strings with maxLength, arrays with maxItems, nested objects
# without additional properties.
SCHEMAS: list[dict[str, Any]] = [
    YES_NO,
    Finding.model_json_schema() | {"additionalProperties": False},
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
                        "label": {"type": "string", "maxLength": 20},
                        "side": {"type": "string", "enum": ["left", "right", "bilateral"]},
                        "grade": {"type": "integer", "minimum": 1, "maximum": 4},
                    },
                    "required": ["label", "side", "grade"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["findings"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "patient": {
                "type": "object",
                "properties": {
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "sex": {"type": "string", "enum": ["F", "M", "unknown"]},
                },
                "required": ["age", "sex"],
                "additionalProperties": False,
            },
            "study": {
                "type": "object",
                "properties": {
                    "modality": {"type": "string", "enum": ["CR", "CT", "MR", "US"]},
                    "views": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["PA", "AP", "lateral"]},
                        "minItems": 1,
                        "maxItems": 2,
                    },
                    "urgent": {"type": "boolean"},
                },
                "required": ["modality", "views", "urgent"],
                "additionalProperties": False,
            },
        },
        "required": ["patient", "study"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "sizes_mm": {
                "type": "array",
                "items": {"type": "integer", "minimum": -50, "maximum": 500},
                "minItems": 2,
                "maxItems": 4,
            },
            "impression": {"type": "string", "maxLength": 60},
        },
        "required": ["sizes_mm", "impression"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "volume_ml": {"type": "number", "exclusiveMinimum": 0, "maximum": 5000},
            "density_hu": {
                "type": "array",
                "items": {"type": "number", "minimum": -1000, "maximum": 3000},
                "maxItems": 3,
            },
        },
        "required": ["confidence", "volume_ml", "density_hu"],
        "additionalProperties": False,
    },
]
PROMPTS = [
    "Is there a pleural effusion?",
    "Describe the findings as JSON.",
    "List every abnormality.",
    "Measure the nodule in millimetres.",
    "Summarize the study for the referring physician.",
]


async def answer_all(application: Any, requests: list[dict[str, Any]], at_once: int) -> list[ChatCompletion]:
    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://medmo", timeout=120) as http:
            client = openai.AsyncOpenAI(
                base_url="http://medmo/v1", api_key="unused", http_client=http, max_retries=0
            )
            model = (await client.models.list()).data[0].id
            answers: list[ChatCompletion] = []
            for start in range(0, len(requests), at_once):
                batch = requests[start : start + at_once]
                answers += await asyncio.gather(
                    *(client.chat.completions.create(model=model, **request) for request in batch)
                )
            return answers


@pytest.mark.parametrize("engine", ENGINES)
async def test_two_hundred_schema_answers_all_end_and_validate(
    engine: str, runtime: ModelRuntime, random_checkpoint: Path
) -> None:
    requests = [
        {
            "messages": [
                {"role": "user", "content": f"{PROMPTS[number // len(SCHEMAS) % len(PROMPTS)]} ({number})"}
            ],
            "max_tokens": 256,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": f"schema_{number % len(SCHEMAS)}",
                    "schema": SCHEMAS[number % len(SCHEMAS)],
                },
            },
            # Greedy and sampled, each sampled answer with a seed of its own.
            **({} if number % 2 else {"temperature": 0.6 + 0.2 * (number % 5), "seed": number}),
        }
        for number in range(200)
    ]
    application = create_app(settings(random_checkpoint, engine), runtime=runtime)
    answers = await answer_all(application, requests, at_once=25)
    for number, answer in enumerate(answers):
        content = text_of(answer)
        assert answer.choices[0].finish_reason == "stop", (number, content)
        jsonschema.validate(json.loads(content), SCHEMAS[number % len(SCHEMAS)])


NUMBERS = {
    "type": "object",
    "properties": {
        "values": {
            "type": "array",
            "items": {"type": "number", "minimum": -10, "maximum": 10},
            "minItems": 2,
            "maxItems": 4,
        },
        "unit": {"type": "string", "enum": ["mm", "cm"]},
    },
    "required": ["values", "unit"],
    "additionalProperties": False,
}


async def test_answers_with_numbers_end_within_max_tokens(
    runtime: ModelRuntime, random_checkpoint: Path
) -> None:
    requests = [
        {
            "messages": [{"role": "user", "content": f"{PROMPTS[number % len(PROMPTS)]} ({number})"}],
            "max_tokens": 256,
            "response_format": {"type": "json_schema", "json_schema": {"name": "numbers", "schema": NUMBERS}},
        }
        for number in range(10)
    ]
    answers = await answer_all(
        create_app(settings(random_checkpoint, "continuous"), runtime=runtime), requests, 10
    )
    assert all(answer.choices[0].finish_reason == "stop" for answer in answers)


# --- what is refused ---


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}},
            "response_format",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"extra_body": {"top_k": 1001}}, "top_k"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_what_is_out_of_bounds_is_a_400_naming_it(
    client: openai.OpenAI, model: str, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, **extra)
    assert str(refused.value.body["message"]).startswith(f"{param}")  # type: ignore[index]
