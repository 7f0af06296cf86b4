"""The reference engine (MEDMO_ENGINE=generate): whole batches through transformers' `generate()`.

Requests wait briefly in the batch queue (`batcher.py`) and run together in one `generate()` call, which
lasts as long as its longest member. Requests of one task share batches, so a short answer never waits for a
long report. Its tokens arrive all at once, when the batch ends. It is the path every faster engine is
held to, token for token.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from app.engine.batcher import Batched, Batcher
from app.engine.gate import Gated
from app.engine.protocol import Admission, Completed, StreamEvent, TokenDelta
from app.engine.request import Generation, PreparedRequest, Priority
from app.engine.runtime import is_fatal_error
from app.metrics import Metrics


class BatchGenerator(Protocol):
    def generate(self, batch: Sequence[PreparedRequest]) -> list[Generation]: ...


def _group(request: PreparedRequest) -> str:
    return request.options.group


def _priority(request: PreparedRequest) -> Priority:
    return request.options.priority


class GenerateEngine(Gated):
    name = "generate"

    def __init__(
        self,
        runtime: BatchGenerator,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
        stat_reserve: int = 0,
        priority_aging_s: float = 60.0,
    ) -> None:
        self.batcher: Batcher[PreparedRequest, Generation] = Batcher(
            runtime.generate,
            batch_key=_group,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_s,
            max_queue=max_queue,
            metrics=metrics,
            is_fatal=is_fatal_error,
            priority_of=_priority,
            stat_reserve=stat_reserve,
            priority_aging_s=priority_aging_s,
        )
        self.gate = self.batcher.gate
        self._metrics = metrics

    @property
    def waiting(self) -> int:
        return self.batcher.queued

    @property
    def context(self) -> None:
        return None  # generate() grows its cache to whatever a batch needs

    async def start(self) -> None:
        await self.batcher.start()

    def submit(
        self, admission: Admission, request: PreparedRequest, *, deadline_s: float, deltas: bool = True
    ) -> BatchStream:
        self.gate.check_open()
        waiting = asyncio.ensure_future(self.batcher.submit(admission, request, deadline_s=deadline_s))
        return BatchStream(waiting, deltas, self._metrics, request.options.priority)

    async def stop(self) -> None:
        await self.batcher.stop()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "max_batch_size": self.batcher.max_batch_size,
            "max_wait_ms": self.batcher.max_wait_s * 1000,
        }


class BatchStream:
    """A request's result from its batch: all its tokens at once, then the result."""

    def __init__(
        self,
        waiting: asyncio.Future[Batched[Generation]],
        deltas: bool,
        metrics: Metrics,
        priority: Priority = Priority.ROUTINE,
    ) -> None:
        self._waiting = waiting
        self._deltas = deltas
        self._metrics = metrics
        self._priority = priority

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        try:
            done = await self._waiting
        finally:
            await self.aclose()
        generation = done.result
        self._metrics.time_to_first_token.observe(done.queue_s + done.inference_s)
        self._metrics.latency_by_priority.labels(priority=self._priority.value).observe(
            done.queue_s + done.inference_s
        )
        if self._deltas:  # all at once: whole-batch generation has nothing to show before the batch ends
            yield TokenDelta(generation.token_ids)
        yield Completed(
            generation=generation,
            queue_s=done.queue_s,
            inference_s=done.inference_s,
            batch_size=done.batch_size,
        )

    async def aclose(self) -> None:
        # A request whose batch has not started is then never computed, and its place is given back.
        if not self._waiting.done():
            self._waiting.cancel()
            await asyncio.gather(self._waiting, return_exceptions=True)
