"""Admission, deadlines, disconnects, failures, drain and metrics seen from HTTP, for both engines.

Each test runs against the continuous engine and the generate engine, on the real runtime, with a gate in
front of the model's work (prefill and decode steps, or generate() calls) that holds it where the test says.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

import app.api.pipeline
from app.api.deps import Service
from app.conversation import Conversation
from app.engine.build import continuous_engine, generate_engine
from app.engine.protocol import Engine
from app.engine.request import GenerationOptions
from app.engine.runtime import ModelRuntime, Runtime
from app.engine.slots import SlotRunner
from app.imaging import ImageLimits, decode_image
from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from tests.conftest import png_bytes, settings_for
from tests.instrumented import InstrumentedRunner, InstrumentedRuntime


@pytest.fixture(scope="module")
def model_runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint)))


Instruments = InstrumentedRuntime | InstrumentedRunner
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 24, max_frames=1)
OPTIONS = GenerationOptions(max_new_tokens=6)


@dataclass
class Served:
    client: httpx.AsyncClient
    application: FastAPI
    instruments: Instruments

    @property
    def engine(self) -> Engine:
        engine = service_of(self.application).engine
        assert engine is not None
        return engine


@pytest.fixture(params=["continuous", "generate"])
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def serving(
    model_runtime: ModelRuntime, engine_name: str, checkpoint: Path, **overrides: object
) -> AsyncIterator[Served]:
    """An app whose engine is the real one of that name, with the gate around its device work."""
    settings = settings_for(
        checkpoint, engine=engine_name, vqa_max_new_tokens=6, report_max_new_tokens=6, **overrides
    )
    instruments: Instruments
    if engine_name == "generate":
        instruments = InstrumentedRuntime(model_runtime)

        def factory(settings: Settings, runtime: Runtime, metrics: Metrics) -> Engine:
            assert isinstance(instruments, InstrumentedRuntime)
            return generate_engine(settings, instruments, metrics)

    else:
        runner = SlotRunner(model_runtime.model, slots=4, context=settings.max_context, graphs=False)
        instruments = InstrumentedRunner(runner)

        def factory(settings: Settings, runtime: Runtime, metrics: Metrics) -> Engine:
            assert isinstance(instruments, InstrumentedRunner)
            return continuous_engine(settings, instruments, runtime, metrics)

    application = create_app(settings, runtime=model_runtime, engine_factory=factory)
    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://medmo", timeout=30) as client:
            yield Served(client, application, instruments)


def service_of(application: FastAPI) -> Service:
    service = application.state.service
    assert isinstance(service, Service)
    return service


def vqa(client: httpx.AsyncClient, question: str = "Is it normal?", seed: int = 0, **headers: str) -> Any:
    files = {"image": ("scan.png", png_bytes(64 + 16 * seed, 64, seed=seed), "image/png")}
    return client.post("/vqa", files=files, data={"question": question}, headers=headers)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


async def test_concurrent_outputs_equal_one_at_a_time_outputs(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    questions = [f"Question number {n} about this image?" for n in range(6)]
    async with serving(
        model_runtime, engine_name, random_checkpoint, max_batch_size=6, max_wait_ms=5000
    ) as served:
        together = await asyncio.gather(*(vqa(served.client, q, seed=n) for n, q in enumerate(questions)))
        shared = served.instruments
    async with serving(model_runtime, engine_name, random_checkpoint, max_batch_size=1) as served:
        alone = [await vqa(served.client, q, seed=n) for n, q in enumerate(questions)]
    if isinstance(shared, InstrumentedRuntime):
        assert [len(batch) for batch in shared.batches] == [6]
    else:
        assert max(shared.decodes) > 1  # requests really were decoded together
    assert all(r.status_code == 200 for r in together + alone)
    assert [r.json()["answer"] for r in together] == [r.json()["answer"] for r in alone]
    assert [r.json()["usage"] for r in together] == [r.json()["usage"] for r in alone]


async def test_a_full_queue_answers_429_before_decoding(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []

    def spying_decoder(data: bytes, limits: Any, **options: Any) -> Any:
        decoded.append(len(data))
        return decode_image(data, limits, **options)

    monkeypatch.setattr(app.api.pipeline, "decode_image", spying_decoder)
    async with serving(
        model_runtime,
        engine_name,
        random_checkpoint,
        max_queue=2,
        max_batch_size=1,
        max_wait_ms=0,
        max_images=2,
    ) as served:
        served.instruments.gate.clear()
        first = asyncio.create_task(vqa(served.client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        queued = [asyncio.create_task(vqa(served.client, seed=n)) for n in (1, 2)]
        await wait_until(lambda: served.engine.waiting == 2)
        assert len(decoded) == 3
        began = time.monotonic()
        refused = await vqa(served.client, seed=3)
        assert time.monotonic() - began < 1
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        assert len(decoded) == 3  # the refused upload was never decoded
        served.instruments.gate.set()
        assert [r.status_code for r in await asyncio.gather(first, *queued)] == [200, 200, 200]


async def test_grounding_several_images_takes_a_place_per_image_or_none(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    async with serving(
        model_runtime,
        engine_name,
        random_checkpoint,
        max_queue=3,
        max_images=3,
        max_batch_size=1,
        max_wait_ms=0,
    ) as served:
        served.instruments.gate.clear()
        first = asyncio.create_task(vqa(served.client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        queued = asyncio.create_task(vqa(served.client, seed=1))
        await wait_until(lambda: served.engine.waiting == 1)
        three = [("image", (f"{n}.png", png_bytes(64, 64 + 32 * n, seed=n), "image/png")) for n in range(3)]
        refused = await served.client.post("/ground", files=three)
        # Its first place and the next were taken; the third was refused, and it gave all of them back.
        assert refused.status_code == 429
        assert served.engine.in_flight == 2  # the running request and the queued one
        served.instruments.gate.set()
        assert [r.status_code for r in await asyncio.gather(first, queued)] == [200, 200]
        await wait_until(lambda: served.engine.in_flight == 0)
        answered = await served.client.post("/ground", files=three)
        assert answered.status_code == 200
        assert len(answered.json()["images"]) == 3


async def test_an_expired_request_gets_504_and_the_model_never_sees_it(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    async with serving(
        model_runtime, engine_name, random_checkpoint, max_batch_size=1, max_wait_ms=0
    ) as served:
        served.instruments.gate.clear()
        first = asyncio.create_task(vqa(served.client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        began = time.monotonic()
        expired = await vqa(served.client, seed=1, **{"X-Request-Timeout": "1"})
        assert 1.0 <= time.monotonic() - began < 2.0
        assert expired.status_code == 504
        assert expired.json()["error"]["code"] == "timeout"
        served.instruments.gate.set()
        assert (await first).status_code == 200
        assert (await vqa(served.client, seed=2)).status_code == 200
    assert served.instruments.computed == 2


async def raw_request(
    application: FastAPI,
    chunks: list[bytes],
    disconnect: asyncio.Event,
    *,
    content_length: int | None = None,
    path: str = "/vqa",
) -> list[dict[str, Any]]:
    """Drive the ASGI app as a server would: the body in `chunks`, then http.disconnect once
    `disconnect` is set (until then the client just stays connected, sending nothing more)."""
    body_length = sum(len(chunk) for chunk in chunks) if content_length is None else content_length
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(body_length).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("medmo", 80),
    }
    pending = [
        {
            "type": "http.request",
            "body": chunk,
            "more_body": index < len(chunks) - 1 or content_length is not None,
        }
        for index, chunk in enumerate(chunks)
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await application(scope, receive, send)
    return sent


async def task_route_body(client: httpx.AsyncClient) -> tuple[str, bytes]:
    body = {"image": base64.b64encode(png_bytes(seed=7)).decode(), "question": "gone?"}
    return "/vqa", json.dumps(body).encode()


async def chat_body(client: httpx.AsyncClient) -> tuple[str, bytes]:
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    image = "data:image/png;base64," + base64.b64encode(png_bytes(seed=7)).decode()
    content = [{"type": "text", "text": "gone?"}, {"type": "image_url", "image_url": {"url": image}}]
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return "/v1/chat/completions", json.dumps(body).encode()


@pytest.mark.parametrize("request_body", [task_route_body, chat_body], ids=["task route", "chat"])
async def test_a_client_that_disconnects_while_queued_is_not_computed(
    model_runtime: ModelRuntime,
    engine_name: str,
    random_checkpoint: Path,
    request_body: Callable[[httpx.AsyncClient], Awaitable[tuple[str, bytes]]],
) -> None:
    async with serving(
        model_runtime, engine_name, random_checkpoint, max_batch_size=1, max_wait_ms=0
    ) as served:
        path, body = await request_body(served.client)
        served.instruments.gate.clear()
        first = asyncio.create_task(vqa(served.client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        disconnect = asyncio.Event()
        leaving = asyncio.create_task(raw_request(served.application, [body], disconnect, path=path))
        await wait_until(lambda: served.engine.waiting == 1)
        disconnect.set()
        sent = await asyncio.wait_for(leaving, 5)
        assert sent[0]["status"] == 499
        served.instruments.gate.set()
        assert (await first).status_code == 200
        await wait_until(lambda: served.engine.in_flight == 0)
    assert served.instruments.computed == 1


async def test_a_failing_request_fails_alone(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    sizes = [
        model_runtime.prepare(
            Conversation.about(decode_image(png_bytes(64 + 16 * n, 64, seed=n), LIMITS).picture, "q"), OPTIONS
        )
        for n in range(4)
    ]
    poisoned_size = sizes[2].model_input_size
    assert [s.model_input_size for s in sizes].count(poisoned_size) == 1
    async with serving(
        model_runtime, engine_name, random_checkpoint, max_batch_size=4, max_wait_ms=500
    ) as served:
        served.instruments.poisoned = lambda request: request.model_input_size == poisoned_size
        served.instruments.gate.clear()
        tasks = [asyncio.create_task(vqa(served.client, seed=n)) for n in range(4)]
        await wait_until(lambda: served.instruments.inside.is_set() and served.engine.in_flight == 4)
        await asyncio.sleep(0.3)  # all four prepared and waiting
        served.instruments.gate.set()
        outcomes = await asyncio.gather(*tasks)
        assert [r.status_code for r in outcomes] == [200, 200, 500, 200]
        assert outcomes[2].json()["error"]["code"] == "inference_failed"
        assert (await served.client.get("/readyz")).status_code == 200


async def test_a_dead_worker_turns_probes_red_and_fails_the_queue_fast(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    async with serving(
        model_runtime, engine_name, random_checkpoint, max_batch_size=1, max_wait_ms=0
    ) as served:
        served.instruments.gate.clear()
        served.instruments.fault = torch.AcceleratorError(
            "CUDA error: an illegal memory access was encountered"
        )
        client = served.client
        first = asyncio.create_task(vqa(client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        queued = [asyncio.create_task(vqa(client, seed=n)) for n in (1, 2)]
        await asyncio.sleep(0.2)
        served.instruments.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(first, *queued), 10)
        assert [r.status_code for r in outcomes] == [503, 503, 503]
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/readyz")).json() == {"status": "dead"}
        assert (await client.get("/healthz")).status_code == 503
        began = time.monotonic()
        later = await vqa(client, seed=3)
        assert later.status_code == 503
        assert time.monotonic() - began < 1
    assert served.instruments.computed == 1


async def test_draining_answers_503_to_new_work_and_readiness(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    from app.main import drain

    async with serving(model_runtime, engine_name, random_checkpoint, max_wait_ms=0) as served:
        served.instruments.gate.clear()
        accepted = asyncio.create_task(vqa(served.client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        draining = asyncio.create_task(drain(served.application, grace_s=10))
        await asyncio.sleep(0.05)
        assert (await served.client.get("/readyz")).status_code == 503
        refused = await vqa(served.client, seed=1)
        assert refused.status_code == 503
        assert not draining.done()
        served.instruments.gate.set()
        assert (await accepted).status_code == 200
        assert await asyncio.wait_for(draining, 5) is True


async def test_metrics_cover_queue_requests_tokens_and_rejections(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    async with serving(
        model_runtime,
        engine_name,
        random_checkpoint,
        max_queue=1,
        max_batch_size=1,
        max_wait_ms=0,
        max_images=1,
    ) as served:
        served.instruments.gate.clear()
        first = asyncio.create_task(vqa(served.client))
        await asyncio.to_thread(served.instruments.inside.wait, 10)
        second = asyncio.create_task(vqa(served.client, seed=1))
        await wait_until(lambda: served.engine.waiting == 1)
        assert (await vqa(served.client, seed=2)).status_code == 429
        served.instruments.gate.set()
        await asyncio.gather(first, second)
        text = (await served.client.get("/metrics")).text
    assert "medmo_queue_depth 0.0" in text
    assert 'medmo_requests_total{status="200",task="vqa"} 2.0' in text
    assert 'medmo_requests_total{status="429",task="vqa"} 1.0' in text
    assert 'medmo_rejections_total{reason="queue_full"} 1.0' in text
    assert 'medmo_generated_tokens_total{task="vqa"} 12.0' in text
    assert "medmo_time_to_first_token_seconds_count 2.0" in text
    if engine_name == "generate":
        assert "medmo_batch_size_count 2.0" in text
        assert "medmo_queue_wait_seconds_count 2.0" in text
        assert "medmo_batch_inference_seconds_count 2.0" in text
    else:
        assert "medmo_running_requests 0.0" in text
        assert "medmo_waiting_requests 0.0" in text
        assert "medmo_slot_occupancy 0.0" in text
        assert "medmo_prefill_seconds_count 2.0" in text
        # 6 tokens each, the first from the prefill: 5 decode steps each, some of them shared.
        steps = next(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "medmo_decode_step_seconds_count"
        )
        assert 5 <= steps <= 10
        assert "medmo_inter_token_latency_seconds_count 2.0" in text


async def test_a_request_may_ask_for_fewer_tokens_never_more(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    async with serving(model_runtime, engine_name, random_checkpoint) as served:
        files = {"image": ("scan.png", png_bytes(), "image/png")}
        full = await served.client.post("/vqa", files=files, data={"question": "q"})
        short = await served.client.post("/vqa", files=files, data={"question": "q", "max_new_tokens": "3"})
        too_many = await served.client.post(
            "/vqa", files=files, data={"question": "q", "max_new_tokens": "7"}
        )
    assert full.json()["usage"]["completion_tokens"] == 6
    assert short.json()["usage"]["completion_tokens"] == 3
    assert full.json()["answer"].startswith(short.json()["answer"])
    assert too_many.status_code == 422
    assert too_many.json()["error"]["message"] == (
        "max_new_tokens: at most 6 for vqa on this server (MEDMO_VQA_MAX_NEW_TOKENS)"
    )


async def test_a_stalled_upload_gets_408_and_gives_its_place_back(
    model_runtime: ModelRuntime, engine_name: str, random_checkpoint: Path
) -> None:
    async with serving(
        model_runtime, engine_name, random_checkpoint, upload_timeout_s=0.3, max_queue=1, max_images=1
    ) as served:
        began = time.monotonic()
        # Half a body, then nothing: the connection stays open, as a slowloris would keep it.
        sent = await asyncio.wait_for(
            raw_request(
                served.application, [b'{"question": "q", "ima'], asyncio.Event(), content_length=10_000
            ),
            5,
        )
        assert sent[0]["status"] == 408
        assert 0.3 <= time.monotonic() - began < 2
        assert served.engine.in_flight == 0
        assert (await vqa(served.client)).status_code == 200  # the place it held is free again
    assert served.instruments.computed == 1
