"""Batching and admission seen from HTTP, on the real runtime behind an instrumented gate."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

import app.api.pipeline
from app.api.deps import Service
from app.engine.runtime import ModelRuntime
from app.imaging import decode_image
from app.main import create_app
from app.settings import Settings
from tests.conftest import png_bytes, settings_for
from tests.instrumented import InstrumentedRuntime


@pytest.fixture(scope="module")
def model_runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint)))


@pytest.fixture
def runtime(model_runtime: ModelRuntime) -> InstrumentedRuntime:
    return InstrumentedRuntime(model_runtime)


@asynccontextmanager
async def serving(
    runtime: InstrumentedRuntime, checkpoint: Path, **overrides: object
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    settings = settings_for(checkpoint, vqa_max_new_tokens=6, report_max_new_tokens=6, **overrides)
    application = create_app(settings, runtime=runtime)  # type: ignore[arg-type]
    async with LifespanManager(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://medmo", timeout=30) as client:
            yield client, application


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


async def test_outputs_through_the_batcher_equal_unbatched_outputs(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    questions = [f"Question number {n} about this image?" for n in range(6)]
    async with serving(runtime, random_checkpoint, max_batch_size=6, max_wait_ms=5000) as (client, _):
        batched = await asyncio.gather(*(vqa(client, q, seed=n) for n, q in enumerate(questions)))
    assert [len(batch) for batch in runtime.batches] == [6]
    runtime.batches.clear()
    async with serving(runtime, random_checkpoint, max_batch_size=1) as (client, _):
        alone = [await vqa(client, q, seed=n) for n, q in enumerate(questions)]
    assert [len(batch) for batch in runtime.batches] == [1] * 6
    assert all(r.status_code == 200 for r in batched + alone)
    assert [r.json()["answer"] for r in batched] == [r.json()["answer"] for r in alone]
    assert [r.json()["usage"] for r in batched] == [r.json()["usage"] for r in alone]


async def test_a_full_queue_answers_429_before_decoding(
    runtime: InstrumentedRuntime, random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []

    def spying_decoder(data: bytes, limits: Any, **options: Any) -> Any:
        decoded.append(len(data))
        return decode_image(data, limits, **options)

    monkeypatch.setattr(app.api.pipeline, "decode_image", spying_decoder)
    runtime.gate.clear()
    async with serving(runtime, random_checkpoint, max_queue=2, max_batch_size=1, max_wait_ms=0) as (
        client,
        application,
    ):
        batcher = service_of(application).batcher
        assert batcher is not None
        first = asyncio.create_task(vqa(client))
        await asyncio.to_thread(runtime.inside.wait, 10)
        queued = [asyncio.create_task(vqa(client, seed=n)) for n in (1, 2)]
        await wait_until(lambda: batcher.queued == 2)
        assert len(decoded) == 3
        began = time.monotonic()
        refused = await vqa(client, seed=3)
        assert time.monotonic() - began < 1
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "overloaded"
        assert int(refused.headers["retry-after"]) >= 1
        assert len(decoded) == 3  # the refused upload was never decoded
        runtime.gate.set()
        assert [r.status_code for r in await asyncio.gather(first, *queued)] == [200, 200, 200]


async def test_an_expired_request_gets_504_and_the_runtime_never_sees_it(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    runtime.gate.clear()
    async with serving(runtime, random_checkpoint, max_batch_size=1, max_wait_ms=0) as (client, _):
        first = asyncio.create_task(vqa(client))
        await asyncio.to_thread(runtime.inside.wait, 10)
        began = time.monotonic()
        expired = await vqa(client, seed=1, **{"X-Request-Timeout": "1"})
        assert 1.0 <= time.monotonic() - began < 2.0
        assert expired.status_code == 504
        assert expired.json()["error"]["code"] == "timeout"
        runtime.gate.set()
        assert (await first).status_code == 200
        assert (await vqa(client, seed=2)).status_code == 200
    assert runtime.computed == 2


async def raw_request(
    application: FastAPI, chunks: list[bytes], disconnect: asyncio.Event, *, content_length: int | None = None
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
        "path": "/vqa",
        "raw_path": b"/vqa",
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


async def test_a_client_that_disconnects_while_queued_is_not_computed(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    runtime.gate.clear()
    async with serving(runtime, random_checkpoint, max_batch_size=1, max_wait_ms=0) as (client, application):
        batcher = service_of(application).batcher
        assert batcher is not None
        first = asyncio.create_task(vqa(client))
        await asyncio.to_thread(runtime.inside.wait, 10)
        disconnect = asyncio.Event()
        body = json.dumps(
            {"image": base64.b64encode(png_bytes(seed=7)).decode(), "question": "gone?"}
        ).encode()
        leaving = asyncio.create_task(raw_request(application, [body], disconnect))
        await wait_until(lambda: batcher.queued == 1)
        disconnect.set()
        sent = await asyncio.wait_for(leaving, 5)
        assert sent[0]["status"] == 499
        runtime.gate.set()
        assert (await first).status_code == 200
        await wait_until(lambda: batcher.in_flight == 0)
    assert runtime.computed == 1


async def test_a_dead_worker_turns_probes_red_and_fails_the_queue_fast(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    runtime.gate.clear()
    runtime.fault = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    async with serving(runtime, random_checkpoint, max_batch_size=1, max_wait_ms=0) as (client, _):
        first = asyncio.create_task(vqa(client))
        await asyncio.to_thread(runtime.inside.wait, 10)
        queued = [asyncio.create_task(vqa(client, seed=n)) for n in (1, 2)]
        await asyncio.sleep(0.2)
        runtime.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(first, *queued), 10)
        assert [r.status_code for r in outcomes] == [503, 503, 503]
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/readyz")).json() == {"status": "dead"}
        assert (await client.get("/healthz")).status_code == 503
        began = time.monotonic()
        later = await vqa(client, seed=3)
        assert later.status_code == 503
        assert time.monotonic() - began < 1
    assert runtime.computed == 1


async def test_draining_answers_503_to_new_work_and_readiness(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    from app.main import drain

    runtime.gate.clear()
    async with serving(runtime, random_checkpoint, max_wait_ms=0) as (client, application):
        accepted = asyncio.create_task(vqa(client))
        await asyncio.to_thread(runtime.inside.wait, 10)
        draining = asyncio.create_task(drain(application, grace_s=10))
        await asyncio.sleep(0.05)
        assert (await client.get("/readyz")).status_code == 503
        refused = await vqa(client, seed=1)
        assert refused.status_code == 503
        assert not draining.done()
        runtime.gate.set()
        assert (await accepted).status_code == 200
        assert await asyncio.wait_for(draining, 5) is True


async def test_metrics_cover_queue_batches_requests_tokens_and_rejections(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    runtime.gate.clear()
    async with serving(runtime, random_checkpoint, max_queue=1, max_batch_size=1, max_wait_ms=0) as (
        client,
        _,
    ):
        first = asyncio.create_task(vqa(client))
        await asyncio.to_thread(runtime.inside.wait, 10)
        second = asyncio.create_task(vqa(client, seed=1))
        await asyncio.sleep(0.3)
        assert (await vqa(client, seed=2)).status_code == 429
        runtime.gate.set()
        await asyncio.gather(first, second)
        text = (await client.get("/metrics")).text
    assert "medmo_queue_depth 0.0" in text
    assert "medmo_batch_size_count 2.0" in text
    assert "medmo_queue_wait_seconds_count 2.0" in text
    assert "medmo_batch_inference_seconds_count 2.0" in text
    assert 'medmo_requests_total{status="200",task="vqa"} 2.0' in text
    assert 'medmo_requests_total{status="429",task="vqa"} 1.0' in text
    assert 'medmo_rejections_total{reason="queue_full"} 1.0' in text
    assert 'medmo_generated_tokens_total{task="vqa"}' in text


async def test_a_stalled_upload_gets_408_and_gives_its_place_back(
    runtime: InstrumentedRuntime, random_checkpoint: Path
) -> None:
    async with serving(runtime, random_checkpoint, upload_timeout_s=0.3, max_queue=1) as (
        client,
        application,
    ):
        batcher = service_of(application).batcher
        assert batcher is not None
        began = time.monotonic()
        # Half a body, then nothing: the connection stays open, as a slowloris would keep it.
        sent = await asyncio.wait_for(
            raw_request(application, [b'{"question": "q", "ima'], asyncio.Event(), content_length=10_000), 5
        )
        assert sent[0]["status"] == 408
        assert 0.3 <= time.monotonic() - began < 2
        assert batcher.in_flight == 0
        assert (await vqa(client)).status_code == 200  # the place it held is free again
    assert runtime.computed == 1
