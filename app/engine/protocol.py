"""The engine boundary: what the HTTP layer may ask of whatever turns prepared requests into tokens.

An engine admits requests (or refuses them at once), then streams each admitted request's tokens as they
are generated, ending with the finished result. A non-streaming answer is that stream collected. The
lifecycle (ready, draining, stopped, dead) and the errors below are the same for every engine, so the HTTP
layer maps them to statuses once, whichever engine serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from app.engine.request import Generation, PreparedRequest, Priority, TokenLogprobs


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"


# --- what an engine refuses or fails with ---


class RejectedError(Exception):
    """The request was refused before any work was done on it."""


class QueueFullError(RejectedError):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__("the server is at capacity; retry later")
        self.retry_after_s = retry_after_s


class NotAcceptingError(RejectedError):
    """Draining for shutdown, stopped, or the worker died: no new work is taken."""


class ContextTooLongError(RejectedError):
    """The prompt and the tokens asked for do not fit in the context the engine was sized for."""


class WorkerDiedError(RuntimeError):
    """The inference worker failed in a way it cannot recover from; the process must be restarted."""


class DeadlineExceededError(Exception):
    """The request's deadline passed before its result was ready."""


class BatchFailedError(RuntimeError):
    """Generation failed for this request alone (the others it ran with were served without it)."""


# --- what an engine streams ---


@dataclass(frozen=True)
class TokenDelta:
    """Tokens a request generated since its previous event."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] | None = None  # one per token, when the request asked for them


@dataclass(frozen=True)
class Completed:
    """The last event of a request's stream."""

    generation: Generation
    queue_s: float  # from entering the engine to the model starting on it
    inference_s: float  # from the model starting on it to its last token
    batch_size: int  # the most requests that shared a forward pass with it


StreamEvent = TokenDelta | Completed


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


class RequestStream(Protocol):
    """One submitted request's events. Iterate it once; close it to abandon the request."""

    def __aiter__(self) -> AsyncIterator[StreamEvent]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    """Turns prepared requests into tokens. The HTTP layer sees nothing else of the model's scheduling."""

    name: str

    @property
    def state(self) -> EngineState: ...

    @property
    def in_flight(self) -> int:
        """Admitted and not yet finished: being read or prepared, waiting, or running."""
        ...

    @property
    def waiting(self) -> int:
        """Submitted and not yet started by the model."""
        ...

    @property
    def context(self) -> int | None:
        """Most tokens one request may hold, prompt and answer together; None if the engine sets no bound."""
        ...

    async def start(self) -> None:
        """Start serving; returns once requests are taken (READY), or raises if the engine cannot start."""
        ...

    def check_admission(self, priority: Priority = Priority.ROUTINE) -> None:
        """Refuse at once (QueueFullError, NotAcceptingError) what `admit` would refuse now."""
        ...

    def admit(self, priority: Priority = Priority.ROUTINE) -> Admission:
        """Take a place or be refused at once (QueueFullError, NotAcceptingError), before any work is done;
        the last places are kept for stat requests."""
        ...

    def submit(
        self, admission: Admission, request: PreparedRequest, *, deadline_s: float, deltas: bool = True
    ) -> RequestStream:
        """Hand an admitted request to the engine now (or refuse it: NotAcceptingError, ContextTooLongError).

        The stream owns the admission from here on. Its events are the request's tokens as they are
        generated (unless `deltas` is false), then one Completed; past `deadline_s` (time.monotonic())
        iterating raises DeadlineExceededError. Closing it early (a client that went away) stops the
        request's generation.
        """
        ...

    def begin_drain(self) -> None:
        """Stop taking new work; what was accepted still runs."""
        ...

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is admitted or running. False if the timeout passed first."""
        ...

    async def stop(self) -> None: ...

    def describe(self) -> dict[str, object]:
        """What an operator should know about this engine (for /info), in plain values."""
        ...


async def complete(
    engine: Engine, admission: Admission, request: PreparedRequest, *, deadline_s: float
) -> Completed:
    """Run a request to its end and return the final event: the non-streaming way to use an engine."""
    async with aclosing(engine.submit(admission, request, deadline_s=deadline_s, deltas=False)) as events:
        async for event in events:
            if isinstance(event, Completed):
                return event
    raise WorkerDiedError("the engine ended a stream without a result")
