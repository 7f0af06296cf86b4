"""Answers streamed as Server-Sent Events, on the tiny checkpoints and a real server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from bench.servers import RunningServer, serve
from tests.conftest import README_GROUNDING_REPLY, png_bytes, settings_for

EVENTS = {"Accept": "text/event-stream"}
REQUESTS = [
    ("/vqa", {"question": "Is there a pneumothorax?"}),
    ("/report", {"indication": "cough"}),
    ("/ground", {"target": "nodule"}),
]


def parse_events(text: str) -> list[tuple[str, Any]]:
    """(event, data) pairs of a text/event-stream body."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def comparable(body: dict[str, Any]) -> dict[str, Any]:
    """A response without what differs between two calls of the same request."""
    return {key: value for key, value in body.items() if key not in ("request_id", "timing")}


def the_text(path: str, body: dict[str, Any]) -> str:
    return {"/vqa": body.get("answer"), "/report": body.get("report", {}).get("text")}.get(path) or body[
        "raw_text"
    ]


@pytest.fixture(scope="module")
def reply_client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    settings = settings_for(reply_checkpoint(README_GROUNDING_REPLY))
    with TestClient(create_app(settings)) as client:
        yield client


def post(client: TestClient, path: str, fields: dict[str, str], **headers: str) -> httpx.Response:
    return client.post(
        path, files={"image": ("a.png", png_bytes(1000, 800), "image/png")}, data=fields, headers=headers
    )


@pytest.mark.parametrize(("path", "fields"), REQUESTS)
@pytest.mark.parametrize("client_name", ["random_client", "reply_client"])
def test_the_result_event_is_the_json_answer_and_the_deltas_are_its_text(
    path: str, fields: dict[str, str], client_name: str, request: pytest.FixtureRequest
) -> None:
    client: TestClient = request.getfixturevalue(client_name)
    plain = post(client, path, fields)
    streamed = post(client, path, fields, **EVENTS)
    assert plain.status_code == streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = parse_events(streamed.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "result"
    assert set(kinds[:-1]) <= {"delta"}
    result = events[-1][1]
    assert comparable(result) == comparable(plain.json())
    assert result["request_id"] == streamed.headers["x-request-id"]
    generated = "".join(data["text"] for kind, data in events if kind == "delta")
    if path == "/ground":
        assert generated == result["raw_text"]
    if client_name == "reply_client":
        assert generated == README_GROUNDING_REPLY
        if path == "/ground":
            assert len(result["findings"]) == 2  # the boxes, parsed from the streamed text too


def test_stream_true_is_the_same_as_asking_for_events(random_client: TestClient) -> None:
    by_field = post(random_client, "/vqa", {"question": "q", "stream": "true"})
    by_header = post(random_client, "/vqa", {"question": "q"}, **EVENTS)
    assert comparable(parse_events(by_field.text)[-1][1]) == comparable(parse_events(by_header.text)[-1][1])


KEY = "key-one-of-enough-length"


@pytest.fixture(scope="module")
def keyed_client(random_checkpoint: Path) -> Iterator[TestClient]:
    settings = settings_for(random_checkpoint, api_keys=KEY, vqa_max_new_tokens=4)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize(
    ("fields", "headers", "status"),
    [
        ({"question": "q"}, {"X-API-Key": "a-wrong-key-of-enough-length"}, 401),
        ({"question": "q" * 4001}, {}, 422),
        ({"question": "q", "max_new_tokens": "100000"}, {}, 422),
        ({"question": "q", "stream": "true"}, {"Accept": "application/dicom"}, 406),
    ],
)
def test_refusals_are_plain_responses_before_any_stream(
    keyed_client: TestClient, fields: dict[str, str], headers: dict[str, str], status: int
) -> None:
    response = post(keyed_client, "/vqa", fields, **{"X-API-Key": KEY, **EVENTS, **headers})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert "error" in response.json()


def test_a_body_too_large_is_a_plain_413(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa",
        content=b"x",
        headers={**EVENTS, "content-type": "application/json", "content-length": str(1 << 40)},
    )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/json"


@pytest.fixture(scope="module")
def slow_server(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Long answers from random weights: long enough to see text arrive over time."""
    env = {
        "MEDMO_REPORT_MAX_NEW_TOKENS": "600",
        "MEDMO_MAX_QUEUE": "1",
        "MEDMO_MAX_IMAGES": "1",
        "MEDMO_MAX_SLOTS": "1",
    }
    with serve(random_checkpoint, tmp_path_factory.mktemp("slow") / "server.log", env=env) as server:
        yield server


def stream_report(
    server: RunningServer, client: httpx.Client, deltas_to_read: int | None = None
) -> list[float]:
    """Arrival times of the delta events (all of them, or the first few before hanging up)."""
    arrivals: list[float] = []
    with client.stream(
        "POST", f"{server.url}/report", files={"image": ("a.png", png_bytes(), "image/png")}, headers=EVENTS
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "event: delta":
                arrivals.append(time.monotonic())
                if deltas_to_read is not None and len(arrivals) == deltas_to_read:
                    break
    return arrivals


def metric(server: RunningServer, name: str, default: float | None = None) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    assert default is not None, f"{name} is not exported"
    return default  # a labelled counter appears with its first count


def wait_for(server: RunningServer, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric(server, name) != value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.005)


def test_text_arrives_as_it_is_written(slow_server: RunningServer) -> None:
    with httpx.Client(timeout=120) as client:
        began = time.monotonic()
        arrivals = stream_report(slow_server, client)
    first, last = arrivals[0] - began, arrivals[-1] - began
    assert len(arrivals) > 100
    assert first < last / 4, f"first text after {first:.2f} s, last after {last:.2f} s"


def test_a_client_that_hangs_up_mid_stream_stops_its_generation(slow_server: RunningServer) -> None:
    steps_before = metric(slow_server, "medmo_decode_step_seconds_count")
    tokens_before = metric(slow_server, 'medmo_generated_tokens_total{task="report"}', default=0)
    with httpx.Client(timeout=120) as client:
        stream_report(slow_server, client, deltas_to_read=5)
    deadline = time.monotonic() + 10
    while metric(slow_server, "medmo_running_requests") != 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.05)
    steps = metric(slow_server, "medmo_decode_step_seconds_count") - steps_before
    assert steps < 100, f"{steps} decode steps for a client that left after 5 deltas of 600"
    # Its access line says it was abandoned, and the tokens written for it were counted.
    time.sleep(0.2)
    lines = [
        json.loads(line) for line in slow_server.log().splitlines() if '"logger": "medmo.access"' in line
    ]
    assert [line for line in lines if line["path"] == "/report"][-1]["status"] == 499
    assert 5 <= metric(slow_server, 'medmo_generated_tokens_total{task="report"}') - tokens_before < 100
    # The one slot and the one queue place are free again: a new request is served.
    with httpx.Client(timeout=120) as client:
        response = client.post(
            f"{slow_server.url}/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": "q", "max_new_tokens": "3"},
        )
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


def test_streamed_answers_are_timed_in_the_log_and_metrics(slow_server: RunningServer) -> None:
    with httpx.Client(timeout=120) as client:
        stream_report(slow_server, client)
    lines = [json.loads(line) for line in slow_server.log().splitlines() if line.startswith("{")]
    streamed = [line for line in lines if line.get("time_to_first_token_ms") is not None]
    assert streamed
    assert streamed[-1]["tokens_per_s"] > 0
    text = httpx.get(f"{slow_server.url}/metrics", timeout=10).text
    assert 'medmo_stream_first_token_seconds_count{route="report"}' in text
    assert 'medmo_stream_tokens_per_second_count{route="report"}' in text


def test_a_full_queue_is_a_plain_429_before_any_stream(slow_server: RunningServer) -> None:
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(stream_report, slow_server, client)  # holds the one slot
        wait_for(slow_server, "medmo_running_requests", 1)
        waiting = pool.submit(
            client.post,
            f"{slow_server.url}/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": "q", "max_new_tokens": "2"},
        )  # holds the one place in the queue
        wait_for(slow_server, "medmo_queue_depth", 1)
        refused = client.post(
            f"{slow_server.url}/report", files={"image": ("a.png", png_bytes(), "image/png")}, headers=EVENTS
        )
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/json"
        assert int(refused.headers["retry-after"]) >= 1
        assert running.result()
        assert waiting.result().status_code == 200
