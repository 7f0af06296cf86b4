"""Admission and lifecycle, shared by every engine: who may come in, and whether anyone may.

A request takes a place when it arrives, before its upload is read or decoded, and gives it back when the
model starts on it (or when it gives up): `max_queue` bounds the requests admitted and not yet running, and
the next one is refused at once with a Retry-After estimate rather than left to time out. The last
`stat_reserve` places are kept for stat requests: a queue full of routine work refuses routine work, not an
emergency. Draining refuses
new work while accepted work finishes. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import math

from app.engine.protocol import Admission, EngineState, NotAcceptingError, QueueFullError
from app.engine.request import Priority
from app.metrics import Metrics

logger = logging.getLogger("medmo.engine")


class Gate:
    def __init__(self, *, max_queue: int, parallelism: int, metrics: Metrics, stat_reserve: int = 0) -> None:
        """`parallelism`: how many requests the engine serves at once, for the Retry-After estimate."""
        if max_queue < 1 or parallelism < 1:
            raise ValueError("max_queue and parallelism must be positive")
        if not 0 <= stat_reserve < max_queue:
            raise ValueError("the stat reserve must leave places for other work")
        self.max_queue = max_queue
        self.stat_reserve = stat_reserve
        self.parallelism = parallelism
        self._metrics = metrics
        self.admitted = 0  # admitted and not yet running: being read, decoded, prepared, or waiting
        self.running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._service_s = 0.0  # moving average of how long the model works on a request (or a batch)
        self.state = EngineState.STARTING
        self.death_reason: str | None = None

    @property
    def in_flight(self) -> int:
        return self.admitted + self.running

    def admit(self, priority: Priority = Priority.ROUTINE) -> Admission:
        """Take a place or be refused at once, before any work is done on the request."""
        self.check_admission(priority)
        self.admitted += 1
        self._idle.clear()
        self._metrics.queue_depth.set(self.admitted)
        return Admission(self._release)

    def check_admission(self, priority: Priority = Priority.ROUTINE) -> None:
        """Refuse at once what `admit` would refuse now, without taking a place."""
        if self.state is not EngineState.READY:
            self._metrics.rejections.labels(reason=self.state.value).inc()
            if self.state is EngineState.DEAD:
                raise NotAcceptingError("the inference worker has stopped; the service must be restarted")
            raise NotAcceptingError(f"the server is {self.state.value}; not accepting requests")
        places = self.max_queue if priority is Priority.STAT else self.max_queue - self.stat_reserve
        if self.admitted >= places:
            self._metrics.rejections.labels(reason="queue_full").inc()
            raise QueueFullError(self.retry_after_s())

    def check_open(self) -> None:
        """Raise if a request that already holds a place can no longer be served."""
        if self.state in (EngineState.DEAD, EngineState.STOPPED):
            raise NotAcceptingError("the inference worker has stopped; the service must be restarted")

    def retry_after_s(self) -> int:
        rounds_ahead = self.admitted / self.parallelism + 1
        return max(1, math.ceil(self._service_s * rounds_ahead))

    def observe_service_time(self, seconds: float) -> None:
        self._service_s = seconds if self._service_s == 0 else 0.8 * self._service_s + 0.2 * seconds

    # --- running ---

    def started_running(self, count: int = 1) -> None:
        self.running += count
        self._idle.clear()

    def finished_running(self, count: int = 1) -> None:
        self.running -= count
        self._update_idle()

    # --- lifecycle ---

    def open(self) -> None:
        self.state = EngineState.READY

    def begin_drain(self) -> None:
        if self.state is EngineState.READY:
            self.state = EngineState.DRAINING
            logger.info("draining: new requests are refused, %d in flight", self.in_flight)

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if self.state is not EngineState.DEAD:
            self.state = EngineState.STOPPED

    def die(self, exc: BaseException) -> bool:
        """Mark the worker dead. False if it already was."""
        if self.state is EngineState.DEAD:
            return False
        self.state = EngineState.DEAD
        self.death_reason = type(exc).__name__
        logger.critical("inference worker stopped after %s; failing all queued requests", type(exc).__name__)
        return True

    def _release(self) -> None:
        self.admitted -= 1
        self._metrics.queue_depth.set(self.admitted)
        self._update_idle()

    def _update_idle(self) -> None:
        if self.admitted == 0 and self.running == 0:
            self._idle.set()


class Gated:
    """The lifecycle and admission half of an engine, answered by its gate."""

    gate: Gate

    @property
    def state(self) -> EngineState:
        return self.gate.state

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    def check_admission(self, priority: Priority = Priority.ROUTINE) -> None:
        self.gate.check_admission(priority)

    def admit(self, priority: Priority = Priority.ROUTINE) -> Admission:
        return self.gate.admit(priority)

    def begin_drain(self) -> None:
        self.gate.begin_drain()

    async def wait_idle(self, timeout_s: float) -> bool:
        return await self.gate.wait_idle(timeout_s)
