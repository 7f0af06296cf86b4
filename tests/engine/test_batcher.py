"""The batching queue on its own, with a deterministic batch function that records what it was given."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from contextlib import asynccontextmanager

import pytest
import torch

from app.engine.batcher import Batcher
from app.engine.protocol import (
    BatchFailedError,
    DeadlineExceededError,
    EngineState,
    NotAcceptingError,
    QueueFullError,
    WorkerDiedError,
)
from app.engine.runtime import is_fatal_error


class Recorder:
    """Squares numbers in batches, recording every batch; a gate can hold the worker inside a batch."""

    def __init__(self, fail_on: Callable[[int], BaseException | None] = lambda _: None) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: list[int]) -> Sequence[int]:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        self.batches.append(list(items))
        for item in items:
            error = self.fail_on(item)
            if error is not None:
                raise error
        return [item * item for item in items]

    @property
    def seen(self) -> list[int]:
        return [item for batch in self.batches for item in batch]


def make_batcher(
    recorder: Recorder,
    *,
    max_batch_size: int = 8,
    max_wait_s: float = 0.05,
    max_queue: int = 64,
    key: Callable[[int], Hashable] = lambda _: 0,
) -> Batcher[int, int]:
    return Batcher(
        recorder,
        batch_key=key,
        max_batch_size=max_batch_size,
        max_wait_s=max_wait_s,
        max_queue=max_queue,
        is_fatal=is_fatal_error,
    )


def parity(item: int) -> int:
    return item % 2


@asynccontextmanager
async def serving(batcher: Batcher[int, int]) -> AsyncIterator[Batcher[int, int]]:
    await batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


async def submit(batcher: Batcher[int, int], item: int, timeout_s: float = 10) -> int:
    admission = batcher.admit()
    completed = await batcher.submit(admission, item, deadline_s=time.monotonic() + timeout_s)
    return completed.result


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def test_concurrent_requests_join_one_batch_and_none_finish_early() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_batch_size=8, max_wait_s=30)) as batcher:
        tasks = [asyncio.create_task(submit(batcher, n)) for n in range(8)]
        done, _ = await asyncio.wait(tasks, timeout=0.05)
        assert not done  # held by the gate
        recorder.gate.set()
        assert await asyncio.gather(*tasks) == [n * n for n in range(8)]
    assert recorder.batches == [list(range(8))]


async def test_a_partial_batch_waits_max_wait_then_runs() -> None:
    recorder = Recorder()
    async with serving(make_batcher(recorder, max_batch_size=8, max_wait_s=0.3)) as batcher:
        began = time.monotonic()
        tasks = [asyncio.create_task(submit(batcher, n)) for n in range(3)]
        done, _ = await asyncio.wait(tasks, timeout=0.1)
        assert not done  # still waiting for company
        await asyncio.gather(*tasks)
        assert 0.3 <= time.monotonic() - began < 2
    assert recorder.batches == [[0, 1, 2]]


async def test_max_batch_size_is_honoured() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_batch_size=8, max_wait_s=0.05)) as batcher:
        tasks = [asyncio.create_task(submit(batcher, n)) for n in range(20)]
        await asyncio.sleep(0.1)
        recorder.gate.set()
        await asyncio.gather(*tasks)
    assert [len(batch) for batch in recorder.batches] == [8, 8, 4]
    assert recorder.seen == list(range(20))  # first come, first served


async def test_only_requests_with_the_same_key_share_a_batch() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_wait_s=0.05, key=parity)) as batcher:
        tasks = [asyncio.create_task(submit(batcher, n)) for n in range(6)]
        await asyncio.sleep(0.1)
        recorder.gate.set()
        await asyncio.gather(*tasks)
    assert sorted(recorder.batches) == [[0, 2, 4], [1, 3, 5]]


async def test_the_group_waiting_longest_goes_first() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_batch_size=2, max_wait_s=0, key=parity)) as batcher:
        first = asyncio.create_task(submit(batcher, 100))  # occupies the worker
        await asyncio.to_thread(recorder.entered.wait, 5)
        tasks = []
        for n in (1, 3, 5, 2, 7, 4):  # odd ones arrive first and keep arriving
            tasks.append(asyncio.create_task(submit(batcher, n)))
            await asyncio.sleep(0.01)
        recorder.gate.set()
        await asyncio.gather(first, *tasks)
    assert recorder.batches == [[100], [1, 3], [5, 7], [2, 4]]


async def test_a_full_queue_is_refused_at_once_with_a_retry_hint() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_queue=3, max_wait_s=0)) as batcher:
        running = asyncio.create_task(submit(batcher, 1))
        await asyncio.to_thread(recorder.entered.wait, 5)
        queued = [batcher.admit() for _ in range(3)]
        with pytest.raises(QueueFullError) as refused:
            batcher.admit()
        assert refused.value.retry_after_s >= 1
        queued[0].release()
        batcher.admit().release()  # a freed place can be taken again
        for admission in queued:
            admission.release()
        recorder.gate.set()
        await running


async def test_an_expired_request_is_never_computed() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_wait_s=0)) as batcher:
        running = asyncio.create_task(submit(batcher, 1))
        await asyncio.to_thread(recorder.entered.wait, 5)
        with pytest.raises(DeadlineExceededError):
            await submit(batcher, 2, timeout_s=0.1)
        recorder.gate.set()
        await running
        assert await submit(batcher, 3) == 9
    assert recorder.seen == [1, 3]
    assert batcher.in_flight == 0


async def test_a_cancelled_caller_is_dropped_before_its_batch_starts() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_wait_s=0)) as batcher:
        running = asyncio.create_task(submit(batcher, 1))
        await asyncio.to_thread(recorder.entered.wait, 5)
        gone = asyncio.create_task(submit(batcher, 2))
        await asyncio.sleep(0.05)
        gone.cancel()  # what the HTTP layer does when the client disconnects
        await asyncio.gather(gone, return_exceptions=True)
        recorder.gate.set()
        await running
        await submit(batcher, 3)
    assert recorder.seen == [1, 3]


async def test_a_poisoned_request_fails_alone_and_the_rest_of_its_batch_is_served() -> None:
    recorder = Recorder(fail_on=lambda item: ValueError("bad input") if item == 5 else None)
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_batch_size=8, max_wait_s=30)) as batcher:
        tasks = [asyncio.create_task(submit(batcher, n)) for n in range(8)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert [o for n, o in enumerate(outcomes) if n != 5] == [n * n for n in range(8) if n != 5]
    assert isinstance(outcomes[5], BatchFailedError)
    assert batcher.state is EngineState.STOPPED  # stopped by the test, not killed by the failure


async def test_when_every_request_fails_every_future_is_resolved() -> None:
    recorder = Recorder(fail_on=lambda _: RuntimeError("out of memory"))
    async with serving(make_batcher(recorder, max_batch_size=4, max_wait_s=30)) as batcher:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(submit(batcher, n) for n in range(4)), return_exceptions=True), 10
        )
        assert all(isinstance(o, BatchFailedError) for o in outcomes)
        assert batcher.state is EngineState.READY
        assert batcher.in_flight == 0


async def test_a_device_fault_kills_the_worker_and_fails_everything_waiting_fast() -> None:
    recorder = Recorder(
        fail_on=lambda item: torch.AcceleratorError("illegal memory access") if item == 1 else None
    )
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_batch_size=1, max_wait_s=0)) as batcher:
        running = asyncio.create_task(submit(batcher, 1))
        await asyncio.to_thread(recorder.entered.wait, 5)
        waiting = [asyncio.create_task(submit(batcher, n)) for n in (2, 3)]
        await asyncio.sleep(0.05)
        recorder.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(running, *waiting, return_exceptions=True), 5)
        assert all(isinstance(o, WorkerDiedError) for o in outcomes)
        assert batcher.state is EngineState.DEAD
        with pytest.raises(NotAcceptingError):
            batcher.admit()
    assert recorder.seen == [1]


async def test_draining_refuses_new_work_and_finishes_what_was_accepted() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    async with serving(make_batcher(recorder, max_wait_s=0)) as batcher:
        running = asyncio.create_task(submit(batcher, 4))
        await asyncio.to_thread(recorder.entered.wait, 5)
        batcher.begin_drain()
        assert batcher.state is EngineState.DRAINING
        with pytest.raises(NotAcceptingError):
            batcher.admit()
        assert not await batcher.wait_idle(0.05)  # the accepted request is still running
        recorder.gate.set()
        assert await running == 16
        assert await batcher.wait_idle(1)


async def test_stop_fails_what_is_still_queued() -> None:
    recorder = Recorder()
    recorder.gate.clear()
    batcher = make_batcher(recorder, max_wait_s=0, max_batch_size=1)
    await batcher.start()
    running = asyncio.create_task(submit(batcher, 1))
    await asyncio.to_thread(recorder.entered.wait, 5)
    queued = asyncio.create_task(submit(batcher, 2))
    await asyncio.sleep(0.02)
    await batcher.stop()
    recorder.gate.set()
    outcomes = await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 5)
    assert all(isinstance(o, NotAcceptingError) for o in outcomes)
