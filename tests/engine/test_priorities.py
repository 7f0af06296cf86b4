"""Priorities in both engines: stat work is admitted before waiting routine work, has places kept for it in
a full queue, and routine work still finishes under a steady stream of stat work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from app.engine.continuous import ContinuousEngine
from app.engine.generate import GenerateEngine
from app.engine.protocol import Completed, Engine, QueueFullError, complete
from app.engine.request import GenerationOptions, PreparedRequest, Priority
from app.engine.runtime import ModelRuntime
from app.engine.slots import SlotRunner
from app.metrics import Metrics
from app.settings import Settings
from tests.engine.test_continuous import wait_until
from tests.engine.test_sampling import prepare
from tests.instrumented import Gated, InstrumentedRunner, InstrumentedRuntime


@pytest.fixture(scope="module")
def runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint), device="cpu", dtype="float32"))


# The engine, a switch holding or releasing its model, and the gate in front of the model.
Built = tuple[Engine, Callable[[bool], None], Gated]


async def one_slot(
    runtime: ModelRuntime, kind: str, *, max_queue: int = 64, reserve: int = 0, aging_s: float = 60
) -> Built:
    """An engine serving one request at a time, with a gate in front of its model's work."""
    if kind == "continuous":
        runner = InstrumentedRunner(SlotRunner(runtime.model, slots=1, context=2048, graphs=False))
        engine: Engine = ContinuousEngine(
            runner,
            runtime,
            max_queue=max_queue,
            prefill_token_budget=8192,
            metrics=Metrics(),
            stat_reserve=reserve,
            priority_aging_s=aging_s,
        )
        gated = runner
    else:
        instrumented = InstrumentedRuntime(runtime)
        engine = GenerateEngine(
            instrumented,
            max_batch_size=1,
            max_wait_s=0,
            max_queue=max_queue,
            metrics=Metrics(),
            stat_reserve=reserve,
            priority_aging_s=aging_s,
        )
        gated = instrumented
    await engine.start()

    def hold(closed: bool) -> None:
        if closed:
            gated.gate.clear()
        else:
            gated.gate.set()

    return engine, hold, gated


def request(runtime: ModelRuntime, index: int, priority: Priority, tokens: int = 3) -> PreparedRequest:
    prepared = prepare(runtime, index, GenerationOptions(tokens, priority=priority))
    return replace(prepared, options=replace(prepared.options, priority=priority))


@pytest.mark.parametrize("kind", ["continuous", "generate"])
async def test_a_stat_request_goes_before_every_waiting_routine_one(runtime: ModelRuntime, kind: str) -> None:
    engine, hold, _ = await one_slot(runtime, kind)
    finished: list[str] = []

    async def serve(name: str, prepared: PreparedRequest) -> None:
        await complete(
            engine, engine.admit(prepared.options.priority), prepared, deadline_s=time.monotonic() + 120
        )
        finished.append(name)

    try:
        hold(True)
        tasks = [asyncio.create_task(serve("routine 0", request(runtime, 0, Priority.ROUTINE)))]
        await asyncio.sleep(0.2)  # the first is taken by the model, which the gate holds
        tasks += [
            asyncio.create_task(serve(f"routine {n}", request(runtime, n, Priority.ROUTINE)))
            for n in range(1, 20)
        ]
        await asyncio.sleep(0.1)
        tasks.append(asyncio.create_task(serve("stat", request(runtime, 20, Priority.STAT))))
        await asyncio.sleep(0.1)
        hold(False)
        await asyncio.gather(*tasks)
    finally:
        hold(False)
        await engine.stop()
    assert finished[:2] == ["routine 0", "stat"]
    assert finished[2:] == [f"routine {n}" for n in range(1, 20)]


def test_a_full_queue_refuses_routine_work_and_keeps_places_for_stat(runtime: ModelRuntime) -> None:
    async def check() -> None:
        engine, _, _ = await one_slot(runtime, "continuous", max_queue=6, reserve=2)
        try:
            places = [engine.admit(Priority.ROUTINE) for _ in range(3)] + [engine.admit(Priority.URGENT)]
            with pytest.raises(QueueFullError):
                engine.admit(Priority.ROUTINE)
            with pytest.raises(QueueFullError):
                engine.check_admission(Priority.URGENT)
            places += [engine.admit(Priority.STAT), engine.admit(Priority.STAT)]
            with pytest.raises(QueueFullError):
                engine.admit(Priority.STAT)
            for place in places:
                place.release()
        finally:
            await engine.stop()

    asyncio.run(check())


@pytest.mark.parametrize("kind", ["continuous", "generate"])
async def test_routine_work_still_finishes_under_a_steady_stream_of_stat_work(
    runtime: ModelRuntime, kind: str
) -> None:
    engine, hold, gated = await one_slot(runtime, kind, max_queue=512, aging_s=0.3)
    streams: list[asyncio.Task[Completed]] = []

    async def serve(prepared: PreparedRequest) -> Completed:
        return await complete(
            engine, engine.admit(prepared.options.priority), prepared, deadline_s=time.monotonic() + 60
        )

    try:
        # A stat request holds the slot, the routine one waits, and before every later call of the model
        # another stat request arrives (a stat request takes two calls: stat work piles up): without aging
        # the routine request would never be the one the model takes.
        hold(True)
        gated.inside.clear()
        streams.append(asyncio.create_task(serve(request(runtime, 99, Priority.STAT, tokens=2))))
        await asyncio.to_thread(gated.inside.wait, 10)
        routine = asyncio.create_task(serve(request(runtime, 7, Priority.ROUTINE, tokens=2)))
        for index in range(400):
            streams.append(asyncio.create_task(serve(request(runtime, 100 + index, Priority.STAT, tokens=2))))
            await wait_until(lambda: engine.waiting >= 2)
            gated.inside.clear()
            hold(False)
            await asyncio.sleep(0)
            hold(True)
            await asyncio.to_thread(gated.inside.wait, 10)
            if routine.done():
                break
        finished_in_the_stream = routine.done()
        hold(False)
        result = await routine
        stats = await asyncio.gather(*streams)
    finally:
        hold(False)
        await engine.stop()
    assert finished_in_the_stream
    assert result.generation.token_ids
    assert result.queue_s >= 0.6  # it waited behind stat work until it had climbed two priorities ...
    assert sum(1 for stat in stats if stat.queue_s < result.queue_s) >= 3  # ... while stat work went first
