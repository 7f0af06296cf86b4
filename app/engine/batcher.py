"""Dynamic batching: requests wait briefly in an asyncio queue and run together in one generate() call.

Shape (after Ray Serve's batching): one future per request; a batch opens with the oldest waiting request
and closes when it holds `max_batch_size` requests or `max_wait_s` has passed since that request arrived.
Only requests with the same batch key (the same generation options) share a batch. With transformers'
generate() a batch runs until its longest member finishes, so a 20-token VQA answer batched with a
1000-token report would wait for the report: giving each task its own options keeps short and long work in
separate batches. The group served next is the one whose first request comes first by priority, then by
waiting time (`precedence`: a request waiting long climbs), which keeps either from starving; a batch takes
its group's requests in that order.

Admission and lifecycle are the shared gate's (`gate.py`): `admit()` answers at once, before the upload is
read or decoded. The batch itself runs in one dedicated worker thread; futures are resolved on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.engine.gate import Gate
from app.engine.protocol import (
    Admission,
    BatchFailedError,
    DeadlineExceededError,
    EngineState,
    NotAcceptingError,
    WorkerDiedError,
)
from app.engine.request import Priority, precedence
from app.metrics import Metrics

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger("medmo.engine")


@dataclass(frozen=True)
class Batched(Generic[ResultT]):
    result: ResultT
    queue_s: float  # from entering the queue to its batch starting
    inference_s: float  # the batch's generate() time
    batch_size: int


@dataclass(eq=False)
class _Job(Generic[ItemT, ResultT]):
    item: ItemT
    key: Hashable
    admission: Admission
    future: asyncio.Future[Batched[ResultT]]
    deadline: float
    enqueued_at: float = field(default_factory=time.monotonic)


def _never_fatal(_: BaseException) -> bool:
    return False


class Batcher(Generic[ItemT, ResultT]):
    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        batch_key: Callable[[ItemT], Hashable],
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
        is_fatal: Callable[[BaseException], bool] = _never_fatal,
        priority_of: Callable[[ItemT], Priority] = lambda _: Priority.ROUTINE,
        stat_reserve: int = 0,
        priority_aging_s: float = 60.0,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be positive and max_wait_s not negative")
        self._run_batch = run_batch
        self._batch_key = batch_key
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._metrics = metrics or Metrics()
        self.gate = Gate(
            max_queue=max_queue, parallelism=max_batch_size, metrics=self._metrics, stat_reserve=stat_reserve
        )
        self._priority_of = priority_of
        self.priority_aging_s = priority_aging_s
        self._is_fatal = is_fatal
        self._queues: OrderedDict[Hashable, deque[_Job[ItemT, ResultT]]] = OrderedDict()
        self._arrival = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running_batch: list[_Job[ItemT, ResultT]] = []

    # --- lifecycle ---

    @property
    def state(self) -> EngineState:
        return self.gate.state

    @property
    def death_reason(self) -> str | None:
        return self.gate.death_reason

    async def start(self) -> None:
        # One thread: generate() calls never overlap, and the GPU has one stream of work.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medmo-generate")
        self._worker = asyncio.create_task(self._work(), name="medmo-batcher")
        self._worker.add_done_callback(self._on_worker_exit)
        self.gate.open()

    def begin_drain(self) -> None:
        """Stop taking new work; what was accepted still runs."""
        self.gate.begin_drain()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is admitted, queued or running. False if the timeout passed first."""
        return await self.gate.wait_idle(timeout_s)

    async def stop(self) -> None:
        self.gate.close()
        self._fail_queued(NotAcceptingError("the server is shutting down"))
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- requests ---

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    def admit(self) -> Admission:
        """Take a place in the queue or be refused at once, before any work is done on the request."""
        return self.gate.admit()

    def retry_after_s(self) -> int:
        return self.gate.retry_after_s()

    async def submit(self, admission: Admission, item: ItemT, *, deadline_s: float) -> Batched[ResultT]:
        """Queue an admitted request and wait for its result until `deadline_s` (time.monotonic())."""
        try:
            self.gate.check_open()
        except NotAcceptingError:
            admission.release()
            raise
        loop = asyncio.get_running_loop()
        job: _Job[ItemT, ResultT] = _Job(
            item=item,
            key=self._batch_key(item),
            admission=admission,
            future=loop.create_future(),
            deadline=deadline_s,
        )
        self._queues.setdefault(job.key, deque()).append(job)
        self._arrival.set()
        try:
            remaining = deadline_s - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that comes in
                # the same loop iteration as the result.
                async with asyncio.timeout(remaining):
                    return await asyncio.shield(job.future)
            except TimeoutError:
                raise DeadlineExceededError() from None
        finally:
            # Whatever happened to the caller (deadline, disconnect, cancellation), a job that has not
            # started is never computed, and its place is given back.
            if not job.future.done():
                job.future.cancel()
            admission.release()

    # --- the worker ---

    def _precedence(self, job: _Job[ItemT, ResultT], now: float) -> tuple[float, float]:
        waited = now - job.enqueued_at
        return precedence(self._priority_of(job.item), waited, self.priority_aging_s), job.enqueued_at

    def _first_key(self) -> Hashable | None:
        """Drop finished requests; return the key of the request to serve first (priority, then age), its
        group's queue put in that order."""
        now = time.monotonic()
        first: tuple[tuple[float, float], Hashable] | None = None
        for key in list(self._queues):
            queue = deque(job for job in self._queues[key] if not self._discard_if_dead(job, now))
            if not queue:
                del self._queues[key]
                continue
            queue = deque(sorted(queue, key=lambda job: self._precedence(job, now)))
            self._queues[key] = queue
            rank = self._precedence(queue[0], now)
            if first is None or rank < first[0]:
                first = (rank, key)
        for priority in Priority:
            waiting = sum(
                1
                for queue in self._queues.values()
                for job in queue
                if self._priority_of(job.item) is priority
            )
            self._metrics.waiting_by_priority.labels(priority=priority.value).set(waiting)
        return None if first is None else first[1]

    def _discard_if_dead(self, job: _Job[ItemT, ResultT], now: float) -> bool:
        if job.future.done():  # the caller gave up: timed out, disconnected or cancelled
            return True
        if job.deadline <= now:
            self._metrics.rejections.labels(reason="deadline").inc()
            job.future.set_exception(DeadlineExceededError())
            return True
        return False

    def _take_batch(self, key: Hashable) -> list[_Job[ItemT, ResultT]]:
        queue = self._queues.get(key, deque())
        batch: list[_Job[ItemT, ResultT]] = []
        now = time.monotonic()
        while queue and len(batch) < self.max_batch_size:
            job = queue.popleft()
            if not self._discard_if_dead(job, now):
                batch.append(job)
        if not queue:
            self._queues.pop(key, None)
        return batch

    async def _work(self) -> None:
        while True:
            key = self._first_key()
            if key is None:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            head = self._queues[key][0]
            # A batch waits for company only so long; a stat request's does not wait at all.
            urgency = 0.0 if self._priority_of(head.item) is Priority.STAT else self.max_wait_s
            closes_at = head.enqueued_at + urgency
            while len(self._queues.get(key, ())) < self.max_batch_size:
                remaining = closes_at - time.monotonic()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrival.wait()
                except TimeoutError:
                    break
            batch = self._take_batch(key)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Job[ItemT, ResultT]]) -> None:
        started = time.monotonic()
        self.gate.started_running(len(batch))
        for job in batch:
            job.admission.release()
            self._metrics.queue_wait.observe(started - job.enqueued_at)
        self._metrics.batch_size.observe(len(batch))
        loop = asyncio.get_running_loop()
        self._running_batch = batch
        try:
            outcomes = await loop.run_in_executor(
                self._executor, self._run_isolating, [j.item for j in batch]
            )
        except asyncio.CancelledError:
            self._fail_running(NotAcceptingError("the server is shutting down"))
            raise
        except BaseException as exc:
            # Fatal: the device or the process is in a state no retry can fix.
            self._fail_running(WorkerDiedError("the inference worker failed; the service must be restarted"))
            self._die(exc)
            raise
        finally:
            self._running_batch = []
            self.gate.finished_running(len(batch))
        elapsed = time.monotonic() - started
        self.gate.observe_service_time(elapsed)
        self._metrics.inference_time.observe(elapsed)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(
                    Batched(
                        result=outcome,
                        queue_s=started - job.enqueued_at,
                        inference_s=elapsed,
                        batch_size=len(batch),
                    )
                )

    def _run_isolating(self, items: list[ItemT]) -> list[ResultT | BatchFailedError]:
        """Run a batch; if it fails, split it to find the failing request and still serve the rest.

        Halving also answers out-of-memory errors, which smaller batches often avoid. Runs in the worker
        thread. Fatal errors (see `is_fatal`) are not retried: they propagate and stop the worker.
        """
        try:
            results = list(self._run_batch(items))
        except Exception as exc:
            if self._is_fatal(exc):
                raise
            if len(items) == 1:
                logger.warning("generation failed for one request: %s", type(exc).__name__)
                failed = BatchFailedError("generation failed for this request")
                failed.__cause__ = exc
                return [failed]
            middle = len(items) // 2
            return self._run_isolating(items[:middle]) + self._run_isolating(items[middle:])
        if len(results) != len(items):
            raise WorkerDiedError(f"the runtime returned {len(results)} results for {len(items)} requests")
        return list(results)

    def _die(self, exc: BaseException) -> None:
        if self.gate.die(exc):
            self._fail_queued(
                WorkerDiedError("the inference worker has stopped; the service must be restarted")
            )

    def _fail_running(self, error: Exception) -> None:
        for job in self._running_batch:
            if not job.future.done():
                job.future.set_exception(error)

    def _fail_queued(self, error: Exception) -> None:
        for queue in self._queues.values():
            for job in queue:
                if not job.future.done():
                    job.future.set_exception(error)
        self._queues.clear()

    def _on_worker_exit(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._die(exc)
