"""Dynamic batching: requests wait briefly in an asyncio queue and run together in one generate() call.

Shape (after Ray Serve's batching): one future per request; a batch opens with the oldest waiting request
and closes when it holds `max_batch_size` requests or `max_wait_s` has passed since that request arrived.
Only requests with the same batch key (the same generation options) share a batch. With transformers'
generate() a batch runs until its longest member finishes, so a 20-token VQA answer batched with a
1000-token report would wait for the report: giving each task its own options keeps short and long work in
separate batches, and always serving the group whose head has waited longest keeps either from starving.

Admission is decided before any expensive work: `admit()` answers at once, before the upload is read or
decoded, and a full queue is refused rather than left to time out. The batch itself runs in one dedicated
worker thread; futures are resolved on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from app.metrics import Metrics

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

logger = logging.getLogger("medmo.engine")


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"


class RejectedError(Exception):
    """The request was refused before any work was done on it."""


class QueueFullError(RejectedError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class NotAcceptingError(RejectedError):
    """Draining for shutdown, stopped, or the worker died: no new work is taken."""


class WorkerDiedError(RuntimeError):
    """The inference worker failed in a way it cannot recover from; the process must be restarted."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its result was ready."""


class BatchFailedError(RuntimeError):
    """Generation failed for this request alone (the others in its batch were retried without it)."""


@dataclass(frozen=True)
class Completed(Generic[ResultT]):
    result: ResultT
    queue_s: float  # from entering the queue to its batch starting
    inference_s: float  # the batch's generate() time
    batch_size: int


class Admission:
    """A place in the queue, held from admission until the request starts running or gives up."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(eq=False)
class _Job(Generic[ItemT, ResultT]):
    item: ItemT
    key: Hashable
    admission: Admission
    future: asyncio.Future[Completed[ResultT]]
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
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_queue must be positive and max_wait_s not negative")
        self._run_batch = run_batch
        self._batch_key = batch_key
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics or Metrics()
        self._is_fatal = is_fatal
        self._queues: OrderedDict[Hashable, deque[_Job[ItemT, ResultT]]] = OrderedDict()
        self._admitted = 0  # admitted and not yet running: being read, decoded, prepared, or queued
        self._running = 0
        self._arrival = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor: ThreadPoolExecutor | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running_batch: list[_Job[ItemT, ResultT]] = []
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self.state = EngineState.STARTING
        self.death_reason: str | None = None

    # --- lifecycle ---

    async def start(self) -> None:
        # One thread: generate() calls never overlap, and the GPU has one stream of work.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medmo-generate")
        self._worker = asyncio.create_task(self._work(), name="medmo-batcher")
        self._worker.add_done_callback(self._on_worker_exit)
        self.state = EngineState.READY

    def begin_drain(self) -> None:
        """Stop taking new work; what was accepted still runs."""
        if self.state is EngineState.READY:
            self.state = EngineState.DRAINING
            logger.info("draining: new requests are refused, %d in flight", self.in_flight)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is admitted, queued or running. False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self.state is not EngineState.DEAD:
            self.state = EngineState.STOPPED
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
        return self._admitted + self._running

    def admit(self) -> Admission:
        """Take a place in the queue or be refused at once, before any work is done on the request."""
        if self.state is not EngineState.READY:
            self._metrics.rejections.labels(reason=self.state.value).inc()
            if self.state is EngineState.DEAD:
                raise NotAcceptingError("the inference worker has stopped; the service must be restarted")
            raise NotAcceptingError(f"the server is {self.state.value}; not accepting requests")
        if self._admitted >= self.max_queue:
            self._metrics.rejections.labels(reason="queue_full").inc()
            raise QueueFullError(self.retry_after_s())
        self._admitted += 1
        self._idle.clear()
        self._metrics.queue_depth.set(self._admitted)
        return Admission(self._release_admission)

    def retry_after_s(self) -> int:
        batches_ahead = self._admitted / self.max_batch_size + 1
        return max(1, math.ceil(self._batch_seconds * batches_ahead))

    async def submit(self, admission: Admission, item: ItemT, *, deadline_s: float) -> Completed[ResultT]:
        """Queue an admitted request and wait for its result until `deadline_s` (time.monotonic())."""
        if self.state in (EngineState.DEAD, EngineState.STOPPED):
            admission.release()
            raise NotAcceptingError("the inference worker has stopped; the service must be restarted")
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
                return await asyncio.wait_for(asyncio.shield(job.future), remaining)
            except TimeoutError:
                raise DeadlineExceededError() from None
        finally:
            # Whatever happened to the caller (deadline, disconnect, cancellation), a job that has not
            # started is never computed, and its place is given back.
            if not job.future.done():
                job.future.cancel()
            admission.release()

    # --- the worker ---

    def _release_admission(self) -> None:
        self._admitted -= 1
        self._metrics.queue_depth.set(self._admitted)
        self._update_idle()

    def _update_idle(self) -> None:
        if self._admitted == 0 and self._running == 0:
            self._idle.set()

    def _oldest_key(self) -> Hashable | None:
        """Drop finished heads; return the key whose head has waited longest."""
        now = time.monotonic()
        oldest: _Job[ItemT, ResultT] | None = None
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and self._discard_if_dead(queue[0], now):
                queue.popleft()
            if not queue:
                del self._queues[key]
            elif oldest is None or queue[0].enqueued_at < oldest.enqueued_at:
                oldest = queue[0]
        return None if oldest is None else oldest.key

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
            key = self._oldest_key()
            if key is None:
                self._arrival.clear()
                await self._arrival.wait()
                continue
            head = self._queues[key][0]
            closes_at = head.enqueued_at + self.max_wait_s
            while len(self._queues.get(key, ())) < self.max_batch_size:
                remaining = closes_at - time.monotonic()
                if remaining <= 0:
                    break
                self._arrival.clear()
                try:
                    await asyncio.wait_for(self._arrival.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take_batch(key)
            if batch:
                await self._execute(batch)

    async def _execute(self, batch: list[_Job[ItemT, ResultT]]) -> None:
        started = time.monotonic()
        self._running += len(batch)
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
            self._running -= len(batch)
            self._update_idle()
        elapsed = time.monotonic() - started
        self._batch_seconds = (
            elapsed if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * elapsed
        )
        self._metrics.inference_time.observe(elapsed)
        for job, outcome in zip(batch, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(
                    Completed(
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
        if self.state is EngineState.DEAD:
            return
        self.state = EngineState.DEAD
        self.death_reason = type(exc).__name__
        logger.critical("inference worker stopped after %s; failing all queued requests", type(exc).__name__)
        self._fail_queued(WorkerDiedError("the inference worker has stopped; the service must be restarted"))

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
