"""Urgent studies first, on a real server with one slot: a stat request overtakes waiting routine work, a
full queue still takes stat work, and routine work finishes under a stream of stat work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.servers import RunningServer, serve
from tests.conftest import png_bytes

QUEUE = 24
RESERVE = 2


@pytest.fixture(scope="module")
def server(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {
        "MEDMO_MAX_SLOTS": "1",
        "MEDMO_MAX_QUEUE": str(QUEUE),
        "MEDMO_STAT_RESERVE": str(RESERVE),
        "MEDMO_PRIORITY_AGING_S": "1",
        "MEDMO_VQA_MAX_NEW_TOKENS": "48",
    }
    with serve(random_checkpoint, tmp_path_factory.mktemp("priorities") / "server.log", env=env) as running:
        yield running


async def ask(
    http: httpx.AsyncClient,
    name: str,
    finished: list[str],
    priority: str | None = None,
    *,
    header: bool = False,
) -> httpx.Response:
    data = {"question": f"Is there an effusion? ({name})"}
    headers = {}
    if priority and header:
        headers["X-Priority"] = priority
    elif priority:
        data["priority"] = priority
    response = await http.post(
        "/vqa", files={"image": ("scan.png", png_bytes(96, 64), "image/png")}, data=data, headers=headers
    )
    if response.status_code == 200:
        finished.append(name)
    return response


async def gauge(http: httpx.AsyncClient, sample: str) -> float:
    """A gauge's value from /metrics (0 before the engine first sets it)."""
    lines = (await http.get("/metrics")).text.splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(sample + " ")), 0.0)


async def test_a_stat_request_overtakes_the_routine_requests_waiting(server: RunningServer) -> None:
    finished: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        routine = [asyncio.create_task(ask(http, f"routine {n}", finished)) for n in range(20)]
        deadline = time.monotonic() + 30
        # The queue builds up behind the one slot.
        while await gauge(http, 'medmo_waiting_by_priority{priority="routine"}') < 15:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        started_before = len(finished) + 1  # done, and the one running
        stat = await ask(http, "stat", finished, "stat", header=True)
        assert stat.status_code == 200, stat.text
        await asyncio.gather(*routine)
    # Before every routine request but those the model had started when the stat one reached it: those
    # finished, the one running, and one more that may have started while the stat upload was prepared.
    assert finished.index("stat") <= started_before + 1
    assert len(finished) == 21


async def test_a_full_queue_refuses_routine_work_and_takes_stat_work(server: RunningServer) -> None:
    finished: list[str] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        routine = [asyncio.create_task(ask(http, f"routine {n}", finished)) for n in range(QUEUE + 6)]
        answers = await asyncio.gather(*routine)
        refused = [answer for answer in answers if answer.status_code == 429]
        assert refused, "the queue never filled"
        # Full again: routine work is refused, stat work is taken.
        routine = [asyncio.create_task(ask(http, f"more {n}", finished)) for n in range(QUEUE)]
        deadline = time.monotonic() + 30
        while await gauge(http, "medmo_queue_depth") < QUEUE - RESERVE:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        late_routine, stat = await asyncio.gather(
            ask(http, "late routine", finished, "routine", header=True), ask(http, "stat", finished, "stat")
        )
        await asyncio.gather(*routine)
    assert late_routine.status_code == 429
    assert late_routine.json()["error"]["code"] == "overloaded"
    assert stat.status_code == 200, stat.text


async def test_routine_work_finishes_under_a_stream_of_stat_work(server: RunningServer) -> None:
    finished: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:

        async def stat_stream(worker: int) -> None:
            count = 0
            while not stop.is_set():
                answer = await ask(http, f"stat {worker}.{count}", finished, "stat")
                assert answer.status_code == 200, answer.text
                count += 1

        streams = [asyncio.create_task(stat_stream(worker)) for worker in range(4)]
        await asyncio.sleep(0.5)
        began = time.monotonic()
        routine = await ask(http, "routine", finished)
        waited = time.monotonic() - began
        stop.set()
        await asyncio.gather(*streams)
    assert routine.status_code == 200, routine.text
    assert waited < 30
    assert any(name.startswith("stat") for name in finished[finished.index("routine") - 3 :])
