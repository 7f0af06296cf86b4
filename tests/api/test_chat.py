"""The OpenAI-compatible endpoint, called with the real `openai` package against a real server."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import RunningServer, serve
from tests.conftest import LIVE_API_KEY, README_GROUNDING_REPLY, png_bytes, pydicom_file

KEY = "chat-client-key-of-enough-length"


@pytest.fixture(scope="module")
def chat_server(
    reply_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = {"MEDMO_API_KEYS": KEY, "MEDMO_MAX_UPLOAD_BYTES": str(256 * 1024), "MEDMO_LOG_LEVEL": "debug"}
    log = tmp_path_factory.mktemp("chat") / "server.log"
    with serve(reply_checkpoint(README_GROUNDING_REPLY), log, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def client(chat_server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai_client(chat_server) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    return str(client.models.list().data[0].id)


def openai_client(server: RunningServer, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def conversation(
    image_url: str, question: str = "Detect and localize all abnormalities in this image."
) -> list:  # type: ignore[type-arg]
    return [
        {"role": "system", "content": "You are a medical imaging expert."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": question},
            ],
        },
    ]


def test_a_completion_with_a_base64_image_is_medmos_answer(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    completion = client.chat.completions.create(
        model=model_id, messages=conversation(data_uri(png_bytes(200, 160))), max_tokens=16
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == README_GROUNDING_REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 2  # the reply, then the end of the turn
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 2


def test_a_streamed_completion_arrives_in_chunks(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    stream = client.chat.completions.create(
        model=model_id,
        messages=conversation(data_uri(png_bytes(200, 160))),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == README_GROUNDING_REPLY
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2


def test_a_dicom_image_in_a_data_uri(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    completion = client.chat.completions.create(
        model=model_id, messages=conversation(data_uri(pydicom_file("CT_small.dcm"), "application/dicom"))
    )
    assert completion.choices[0].message.content == README_GROUNDING_REPLY


def chat_tokens_counted(server: RunningServer) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    samples = [
        sample
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "medmo_generated_tokens_total" and sample.labels.get("task") == "chat"
    ]
    return samples[0].value if samples else 0.0


def test_a_stop_sequence_ends_the_answer_before_it(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    counted_before = chat_tokens_counted(chat_server)
    whole = client.chat.completions.create(
        model=model_id, messages=conversation(data_uri(png_bytes())), stop=["<box>"]
    )
    assert whole.choices[0].message.content == "Fractures "
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    assert whole.usage.completion_tokens > 0
    assert chat_tokens_counted(chat_server) - counted_before == whole.usage.completion_tokens
    streamed = client.chat.completions.create(
        model=model_id, messages=conversation(data_uri(png_bytes())), stop="<box>", stream=True
    )
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) == "Fractures "
    )


def test_an_http_url_is_refused_not_fetched(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=model_id, messages=conversation("http://127.0.0.1:9/never-fetched.png")
        )
    assert "never fetches" in str(refused.value)
    assert refused.value.code == "image_url_not_supported"


def test_a_missing_key_is_the_sdks_authentication_error(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    with (
        openai_client(chat_server, key="not-a-key-of-this-server") as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.chat.completions.create(model=model_id, messages=conversation(data_uri(png_bytes())))


def test_an_oversized_image_is_a_413(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model=model_id, messages=conversation(data_uri(b"\x89PNG" + bytes(512 * 1024)))
        )
    assert refused.value.status_code == 413


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ],
)
def test_what_medmo_cannot_honour_is_refused_never_ignored(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=model_id,
            messages=conversation(data_uri(png_bytes())),
            **extra,  # type: ignore[arg-type]
        )
    assert param in str(refused.value)


def test_an_unknown_model_and_too_many_images(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=conversation(data_uri(png_bytes())))
    nine = conversation(data_uri(png_bytes()))
    nine[1]["content"][1:1] = [{"type": "image_url", "image_url": {"url": data_uri(png_bytes())}}] * 8
    with pytest.raises(openai.APIStatusError, match="MEDMO_MAX_IMAGES") as refused:
        client.chat.completions.create(model=model_id, messages=nine)
    assert refused.value.status_code == 413


def access_lines(server: RunningServer) -> list[dict[str, object]]:
    time.sleep(0.2)  # let the last access lines reach the file
    return [
        entry
        for entry in (json.loads(line) for line in server.log().splitlines() if line.startswith("{"))
        if entry.get("logger") == "medmo.access" and entry.get("path") == "/v1/chat/completions"
    ]


def test_images_interleaved_with_text_as_evaluation_harnesses_send_them(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    content: list[dict[str, object]] = []
    for number, (width, height) in enumerate([(200, 160), (96, 128), (160, 96)], start=1):
        content.append({"type": "text", "text": f"<image_{number}>: "})
        content.append(
            {"type": "image_url", "image_url": {"url": data_uri(png_bytes(width, height, seed=number))}}
        )
    content.append({"type": "text", "text": "Which image shows a fracture?"})
    messages = [
        {"role": "system", "content": "You are a medical imaging expert."},
        {"role": "user", "content": content},
    ]
    completion = client.chat.completions.create(model=model_id, messages=messages, max_tokens=64)  # type: ignore[arg-type]
    one = client.chat.completions.create(model=model_id, messages=conversation(data_uri(png_bytes(200, 160))))
    assert completion.choices[0].message.content == README_GROUNDING_REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert one.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 2
    assert completion.usage.prompt_tokens > one.usage.prompt_tokens  # three images' tokens, not one's
    assert access_lines(chat_server)[-2]["images"] == 3


def test_a_two_turn_conversation_and_a_text_only_question(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    first = conversation(data_uri(png_bytes(200, 160)))
    follow_up = [
        *first,
        {"role": "assistant", "content": README_GROUNDING_REPLY},
        {"role": "user", "content": "Which side is the fracture on?"},
    ]
    answered = client.chat.completions.create(model=model_id, messages=follow_up)  # type: ignore[arg-type]
    opening = client.chat.completions.create(model=model_id, messages=first)
    assert answered.choices[0].message.content == README_GROUNDING_REPLY
    assert answered.usage is not None
    assert opening.usage is not None
    assert answered.usage.prompt_tokens > opening.usage.prompt_tokens  # the earlier turns were read
    text_only = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "user", "content": "Summarize: the lungs are clear. No effusion. Heart size normal."}
        ],
    )
    assert text_only.choices[0].message.content == README_GROUNDING_REPLY
    assert text_only.usage is not None
    assert text_only.usage.prompt_tokens < opening.usage.prompt_tokens  # no image tokens
    assert access_lines(chat_server)[-1]["images"] == 0


def test_max_tokens_is_an_upper_bound_served_up_to_what_the_context_holds(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str, live_server: RunningServer
) -> None:
    # The default 4,096-token context and 1,024-token chat limit; evaluation harnesses send 8,192.
    short = client.chat.completions.create(
        model=model_id, messages=conversation(data_uri(png_bytes())), max_tokens=8192
    )
    assert short.choices[0].finish_reason == "stop"
    assert short.usage is not None
    assert short.usage.completion_tokens == 2
    # Random weights never end their turn: a long pasted report leaves less than the chat limit, and the
    # answer runs to the end of the context.
    report = (
        "Findings: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal. " * 170
    )
    with openai_client(live_server, key=LIVE_API_KEY) as live:
        model = live.models.list().data[0].id
        cut = live.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Summarize this report: {report}"}],
            max_tokens=8192,
        )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None
    assert 4096 - 1024 < cut.usage.prompt_tokens < 4096
    assert cut.usage.total_tokens == 4096


def test_chat_is_counted_and_logged_without_its_text(
    chat_server: RunningServer, client: openai.OpenAI, model_id: str
) -> None:
    canary = "Canary question about patient Zebulon Quixote"
    client.chat.completions.create(
        model=model_id, messages=conversation(data_uri(png_bytes()), canary), user="zebulon-user-id"
    )
    metrics = httpx.get(f"{chat_server.url}/metrics", timeout=10).text
    assert 'medmo_requests_total{status="200",task="chat"}' in metrics
    log = chat_server.log()
    assert "Zebulon" not in log
    assert "zebulon-user-id" not in log
    assert any(json.loads(line).get("task") == "chat" for line in log.splitlines() if line.startswith("{"))
