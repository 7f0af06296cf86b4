"""/ground decodes under MedMO's box syntax: on random weights (a model that wants to write gibberish) every
reply still parses into boxes inside its image, or is a single sentence without a box."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.conversation import Conversation
from app.engine.continuous import ContinuousEngine
from app.engine.grammar import box_constraint
from app.engine.protocol import complete
from app.engine.request import GenerationOptions
from app.engine.runtime import ModelRuntime
from app.engine.slots import SlotRunner
from app.main import create_app
from app.metrics import Metrics
from app.tasks.base import Reading
from app.tasks.ground import MAX_FINDINGS, Grounding, extract_boxes
from tests.conftest import encode, rgb_image, settings_for

SIZES = [(320, 224), (200, 480), (640, 160), (96, 96)]
TARGETS = [None, "nodule", "pleural effusion", "fracture"]
PROMPTS = ["Detect any visible diseases or abnormalities in this X-ray image.", "Find the nodule."]
# A finding's line as the grammar writes it, and the sentence a reply without boxes is.
FINDING = re.compile(
    r"[A-Za-z][A-Za-z0-9 ,.'/:;%+-]*<box>\[\[\d+, \d+, \d+, \d+\](, \[\d+, \d+, \d+, \d+\])*\]</box>"
)
SENTENCE = re.compile(r"[A-Za-z][A-Za-z0-9 ,.'/:;%+-]*")


@pytest.fixture
async def client(random_checkpoint: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings_for(random_checkpoint, engine="continuous", max_slots=16, max_queue=64))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            yield http


async def ground(
    client: httpx.AsyncClient, index: int, **fields: Any
) -> tuple[dict[str, Any], tuple[int, int]]:
    width, height = SIZES[index % len(SIZES)]
    target = TARGETS[index % len(TARGETS)]
    image = encode(rgb_image(width, height, seed=index))
    data = {key: str(value).lower() for key, value in fields.items()}
    if target:
        data["target"] = target
    response = await client.post("/ground", files={"image": ("scan.png", image, "image/png")}, data=data)
    assert response.status_code == 200, response.text
    return response.json(), (width, height)


async def test_200_replies_of_random_weights_all_parse_into_boxes_inside_their_image(
    client: httpx.AsyncClient,
) -> None:
    results: list[tuple[dict[str, Any], tuple[int, int]]] = []
    for start in range(0, 200, 32):
        results += await asyncio.gather(
            *(ground(client, index) for index in range(start, start + 32)[: 200 - start])
        )
    assert len(results) == 200
    boxed = 0
    for body, (width, height) in results:
        text = body["raw_text"]
        assert body["finish_reason"] == "stop", text
        findings, _, impression = text.partition("\n\n")  # an impression may follow the findings
        lines = findings.split("\n")
        assert 1 <= len(lines) <= MAX_FINDINGS, text
        # Each line a finding with its boxes, or text alone (a normal study's sentence).
        assert all(FINDING.fullmatch(line) or SENTENCE.fullmatch(line) for line in lines), text
        assert not impression or SENTENCE.fullmatch(impression), text
        written = sum(1 for line in lines if FINDING.fullmatch(line))
        # Every box written is placed, or dropped for having no area (a corner repeated): the grammar
        # bounds every coordinate.
        assert len(body["findings"]) + body["dropped_boxes"] == len(extract_boxes(text)) >= written
        boxed += written > 0
        for finding in body["findings"]:
            box, pixels = finding["box"], finding["box_px"]
            assert 0 <= box["x_min"] < box["x_max"] <= 1
            assert 0 <= box["y_min"] < box["y_max"] <= 1
            assert 0 <= pixels["x_min"] < pixels["x_max"] <= width
            assert 0 <= pixels["y_min"] < pixels["y_max"] <= height
            assert finding["label"]
    assert boxed >= 1  # the random model mostly writes the sentence: the next test holds it to boxes


async def test_200_replies_held_to_boxes_parse_into_boxes_inside_their_image(random_checkpoint: Path) -> None:
    """The grammar without its sentence, through the engine: every reply is boxes, every box lands."""
    runtime = ModelRuntime.load(settings_for(random_checkpoint, device="cpu"))
    task = Grounding()
    requests = []
    for index in range(200):
        width, height = SIZES[index % len(SIZES)]
        prepared = runtime.prepare(
            Conversation.about(rgb_image(width, height, seed=index), PROMPTS[index % len(PROMPTS)]),
            GenerationOptions(1024),
        )
        size = prepared.model_input_size
        requests.append(runtime.constrained(prepared, box_constraint(size, max_findings=3, none_found=False)))
    runner = SlotRunner(runtime.model, slots=32, context=2048, graphs=False)
    engine = ContinuousEngine(runner, runtime, max_queue=256, prefill_token_budget=16384, metrics=Metrics())
    await engine.start()
    try:
        deadline = time.monotonic() + 300
        results = []
        for start in range(0, 200, 64):
            wave = requests[start : start + 64]
            results += await asyncio.gather(
                *(complete(engine, engine.admit(), request, deadline_s=deadline) for request in wave)
            )
    finally:
        await engine.stop()
    placed = 0
    for index, (request, result) in enumerate(zip(requests, results, strict=True)):
        generation = result.generation
        assert generation.finish_reason == "stop", generation.text
        assert all(FINDING.fullmatch(line) for line in generation.text.split("\n")), generation.text
        width, height = SIZES[index % len(SIZES)]
        reading = Reading("pixel", request.model_input_size, (width, height))
        grounded = task.parse(generation.text, reading)
        assert len(grounded.findings) + grounded.dropped == len(extract_boxes(generation.text)) >= 1
        for finding in grounded.findings:
            pixels = finding.box_px
            assert 0 <= pixels.x_min < pixels.x_max <= width
            assert 0 <= pixels.y_min < pixels.y_max <= height
        placed += len(grounded.findings)
    assert placed >= 100  # boxes of no area (a corner written twice) are dropped, and counted


async def test_free_syntax_is_still_available(client: httpx.AsyncClient) -> None:
    constrained, _ = await ground(client, 1)
    free, _ = await ground(client, 1, constrained=False)
    assert free["raw_text"] != constrained["raw_text"]
