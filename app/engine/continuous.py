"""The continuous-batching engine (MEDMO_ENGINE=continuous): requests join and leave the running batch at
every step.

One scheduler thread owns the device. Each iteration it

1. takes new arrivals, and drops requests whose client went away or whose deadline passed (also mid-way
   through decoding: their slot is free for the next request at once);
2. starts waiting requests in free slots, stat before urgent before routine, oldest first within each
   (a request waiting long climbs, `precedence`): their prompts (image included) run packed in one prefill,
   bounded by a token budget so that a burst of new requests cannot stall decoding for long;
3. runs one decode step for every running request;
4. finishes requests that wrote an end-of-turn token or reached their limit, and hands their slots on;
5. sends what happened to the event loop in one callback.

A short answer therefore never waits for a long report: it leaves the batch the moment it is done. The event
loop side (admission, deadlines, drain) is the same gate as the reference engine's. The device work itself
is `slots.SlotRunner`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.engine.gate import Gate, Gated
from app.engine.protocol import (
    Admission,
    BatchFailedError,
    Completed,
    ContextTooLongError,
    DeadlineExceededError,
    NotAcceptingError,
    StreamEvent,
    TokenDelta,
    WorkerDiedError,
)
from app.engine.request import (
    Generation,
    PreparedRequest,
    Priority,
    TokenLogprobs,
    TokenMatcher,
    precedence,
)
from app.engine.runtime import is_fatal_error
from app.engine.sampling import Chosen
from app.metrics import Metrics

logger = logging.getLogger("medmo.engine")

# While requests decode, new ones gather for up to this many prefills' time before they are started.
PREFILL_GATHER_FACTOR = 2.0


class Runner(Protocol):
    """The device work of the engine; `slots.SlotRunner` is the real one."""

    slots: int
    context: int

    @property
    def graphs_replaying(self) -> int:
        """Decode buckets replayed from captured graphs."""
        ...

    def warm_up(self) -> None: ...

    def prefill(
        self, entries: Sequence[tuple[int, PreparedRequest]], masks: Sequence[tuple[int, TokenMatcher]] = ()
    ) -> Chosen:
        """Start requests in consecutive slots; a request sharing an earlier entry's prompt shares its
        prefill. `masks`: the constrained entries' grammars, by slot."""
        ...

    def launch(self, active: int, masks: Sequence[tuple[int, TokenMatcher]] = ()) -> None:
        """Start a decode step for slots 0..active-1 without waiting for it; `masks`: the constrained rows'
        grammars, by row (such a step must follow the collection of every earlier one)."""
        ...

    def collect(self) -> Chosen:
        """The tokens of the oldest launched step not yet collected, once it has ended."""
        ...

    def score(self, request: PreparedRequest) -> tuple[float, ...]:
        """Each of the request's continuations' log-probability as the answer to its prompt."""
        ...

    def move(self, source: int, target: int) -> None: ...

    def release(self, slot: int) -> None: ...

    def describe(self) -> dict[str, object]: ...


class Finisher(Protocol):
    eos_token_ids: frozenset[int]

    def finish(
        self,
        request: PreparedRequest,
        tokens: Sequence[int],
        logprobs: Sequence[TokenLogprobs] | None = None,
    ) -> Generation: ...


@dataclass(eq=False)
class _Job:
    request: PreparedRequest
    place: Admission
    deadline: float
    deltas: bool  # whether the client reads tokens as they come, or only the result
    submitted_at: float
    mailbox: asyncio.Queue[StreamEvent | BaseException] = field(default_factory=asyncio.Queue)
    # Set on the event loop when the client goes away; read by the scheduler at its next iteration.
    abandoned: bool = False
    # The scheduler's own, from here on.
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # when asked for
    matcher: TokenMatcher | None = None  # the grammar's state, for a constrained request
    scores: tuple[float, ...] | None = None  # a scoring request's result
    started_at: float = 0.0
    first_token_at: float = 0.0
    batch_size: int = 0
    failure: BaseException | None = None
    retired: bool = False  # its slot is given up: tokens of a step launched before that are dropped

    def gone(self, now: float) -> bool:
        return self.abandoned or now >= self.deadline


@dataclass
class _Outbox:
    """What one scheduler iteration tells the event loop: delivered together, in order, in one callback."""

    started: list[_Job] = field(default_factory=list)
    events: list[tuple[_Job, TokenDelta]] = field(default_factory=list)
    ended: list[_Job] = field(default_factory=list)  # finished, failed or abandoned after starting
    refused: list[tuple[_Job, BaseException]] = field(default_factory=list)  # failed before starting

    def __bool__(self) -> bool:
        return bool(self.started or self.events or self.ended or self.refused)


class ContinuousEngine(Gated):
    name = "continuous"

    def __init__(
        self,
        runner: Runner,
        finisher: Finisher,
        *,
        max_queue: int,
        prefill_token_budget: int,
        metrics: Metrics,
        is_fatal: Callable[[BaseException], bool] = is_fatal_error,
        stat_reserve: int = 0,
        priority_aging_s: float = 60.0,
    ) -> None:
        self._runner = runner
        self.priority_aging_s = priority_aging_s
        self._finisher = finisher
        self._eos = finisher.eos_token_ids
        self.prefill_token_budget = prefill_token_budget
        self._metrics = metrics
        self._is_fatal = is_fatal
        self.gate = Gate(
            max_queue=max_queue, parallelism=runner.slots, metrics=metrics, stat_reserve=stat_reserve
        )
        self._inbox: deque[_Job] = deque()  # from the loop to the scheduler, under _lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The scheduler's own state.
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []  # the request in slot i is _active[i]
        # The step launched and not yet read: the request in each of its rows then, and when it began.
        self._launched: tuple[list[_Job], float] | None = None
        self._outbox = _Outbox()
        self._prefill_s = 0.0  # moving average of a prefill's duration

    # --- the event loop's side ---

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def running(self) -> int:
        return self.gate.running

    @property
    def context(self) -> int:
        return self._runner.context

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._schedule, args=(ready,), name="medmo-scheduler", daemon=True
        )
        self._thread.start()
        await ready  # decode graphs are captured before the first request is taken
        self.gate.open()

    def submit(
        self, admission: Admission, request: PreparedRequest, *, deadline_s: float, deltas: bool = True
    ) -> JobStream:
        self.gate.check_open()
        self._check_fits(request)
        job = _Job(
            request=request,
            place=admission,
            deadline=deadline_s,
            deltas=deltas,
            submitted_at=time.monotonic(),
        )
        with self._lock:
            self._inbox.append(job)
        self._wake.set()
        return JobStream(self, job)

    def abandon(self, job: _Job) -> None:
        """The request's client is gone: the scheduler stops working on it at its next iteration."""
        job.abandoned = True
        job.place.release()
        self._wake.set()

    def _check_fits(self, request: PreparedRequest) -> None:
        # Every generated token but the last is written to the cache, and the step launched ahead of the
        # last (the scheduler's one-step lead) writes one position more: the prompt and every new token.
        needed = request.prompt_tokens + request.options.max_new_tokens
        if needed > self._runner.context:
            images = len(request.model_input_sizes)
            what = (
                "the prompt"
                if images == 0
                else "the image and prompt"
                if images == 1
                else "the images and prompt"
            )
            raise ContextTooLongError(
                f"{what} take {request.prompt_tokens} tokens and {request.options.max_new_tokens} new tokens were "
                f"asked for: more than the {self._runner.context}-token context the engine holds per request "
                "(MEDMO_MAX_CONTEXT; ask for fewer tokens, a shorter text, or fewer or smaller images)"
            )

    async def stop(self) -> None:
        self.gate.close()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "prefill_token_budget": self.prefill_token_budget,
            **self._runner.describe(),
        }

    def _deliver(self, outbox: _Outbox) -> None:
        """On the event loop: hand one iteration's news to the waiting streams and to the gate."""
        for job in outbox.started:
            # Running now: the queue place goes back first, so the engine is never seen idle in between.
            self.gate.started_running()
            job.place.release()
        for job, delta in outbox.events:
            job.mailbox.put_nowait(delta)
        for job in outbox.ended:
            self.gate.finished_running()
            if job.failure is not None:
                job.mailbox.put_nowait(job.failure)
            elif not job.abandoned:
                try:
                    completed = self._completed(job)
                except Exception as exc:  # turning its tokens into text failed: this request fails alone
                    logger.warning("finishing a request failed: %s", type(exc).__name__)
                    failure = BatchFailedError("generation failed for this request")
                    failure.__cause__ = exc
                    job.mailbox.put_nowait(failure)
                else:
                    job.mailbox.put_nowait(completed)
        for job, error in outbox.refused:
            job.mailbox.put_nowait(error)

    def _completed(self, job: _Job) -> Completed:
        finished_at = time.monotonic()
        if job.scores is not None:
            generation = Generation(
                text="",
                token_ids=(),
                prompt_tokens=job.request.prompt_tokens,
                finish_reason="stop",
                scores=job.scores,
            )
        else:
            generation = self._finisher.finish(job.request, job.tokens, job.logprobs)
        if len(job.tokens) > 1:
            per_token = (finished_at - job.first_token_at) / (len(job.tokens) - 1)
            self._metrics.inter_token_latency.observe(per_token)
        self.gate.observe_service_time(finished_at - job.started_at)
        priority = job.request.options.priority.value
        self._metrics.latency_by_priority.labels(priority=priority).observe(finished_at - job.submitted_at)
        return Completed(
            generation=generation,
            queue_s=job.started_at - job.submitted_at,
            inference_s=finished_at - job.started_at,
            batch_size=job.batch_size,
        )

    # --- the scheduler thread ---

    def _schedule(self, ready: asyncio.Future[None]) -> None:
        with torch.inference_mode():
            try:
                self._runner.warm_up()
            except BaseException as exc:
                self._post(_settle, ready, exc)
                return
            logger.info("continuous engine ready: %s", self._runner.describe())
            self._metrics.decode_graphs.set(self._runner.graphs_replaying)
            self._post(_settle, ready, None)
            try:
                self._serve()
            except BaseException as exc:
                self._fail_everything(
                    WorkerDiedError("the inference worker failed; the service must be restarted")
                )
                outbox, self._outbox = self._outbox, _Outbox()
                self._post(self._died, exc, outbox)

    def _serve(self) -> None:
        while not self._stopping:
            if not self._active and not self._waiting and self._launched is None:
                self._wake.wait()
            self._wake.clear()
            self._take_arrivals()
            self._drop_abandoned()
            if self._prefill_due():
                self._prefill()
            self._decode()
            self._metrics.running_requests.set(len(self._active))
            self._metrics.waiting_requests.set(len(self._waiting))
            waiting = Counter(job.request.options.priority for job in self._waiting)
            for priority in Priority:
                self._metrics.waiting_by_priority.labels(priority=priority.value).set(waiting[priority])
            self._metrics.slot_occupancy.set(len(self._active) / self._runner.slots)
            self._flush()
        self._fail_everything(NotAcceptingError("the server is shutting down"))
        self._flush()

    def _prefill_due(self) -> bool:
        """Whether to start waiting requests now, or let them gather while the running ones decode.

        A prefill stalls every running request for its duration, and much of an eager prefill's cost is
        per call, not per request: starting each arrival at once would interleave a prefill with nearly
        every decode step under steady load. So while others decode, waiting requests gather until they
        could fill a quarter of the free slots, or the oldest has waited a few prefills' time; an idle
        engine starts a request at once.
        """
        free = self._runner.slots - len(self._active)
        if not self._waiting or free == 0:
            return False
        if not self._active or len(self._waiting) >= max(1, free // 4):
            return True
        if any(job.request.options.priority is Priority.STAT for job in self._waiting):
            return True  # an emergency does not wait for company
        waited = time.monotonic() - self._waiting[0].submitted_at
        return waited >= PREFILL_GATHER_FACTOR * self._prefill_s

    def _take_arrivals(self) -> None:
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()

    def _drop_abandoned(self) -> None:
        """Forget requests whose client went away or whose deadline passed, running ones included."""
        now = time.monotonic()
        if any(job.gone(now) for job in self._waiting):
            for job in self._waiting:
                if job.gone(now):
                    self._outbox.refused.append((job, DeadlineExceededError()))
            self._waiting = deque(job for job in self._waiting if not job.gone(now))
        gone = [row for row, job in enumerate(self._active) if job.gone(now)]
        for row in gone:
            self._active[row].failure = DeadlineExceededError()  # what its client sees, if still there
        self._retire(gone)

    def _prefill(self) -> None:
        free = self._runner.slots - len(self._active)
        chosen: list[_Job] = []
        tokens = 0
        now = time.monotonic()
        ranked = sorted(
            self._waiting,
            key=lambda job: (
                precedence(job.request.options.priority, now - job.submitted_at, self.priority_aging_s),
                job.submitted_at,
            ),
        )
        taken: set[int] = set()
        for job in ranked:
            if len(chosen) == free:
                break
            if job.request.options.continuations is not None:
                taken.add(id(job))
                self._score(job)
                continue
            # A prompt shared with the request before it (the n choices of one request) is computed once.
            shared = bool(chosen) and chosen[-1].request.features is job.request.features
            cost = 0 if shared else job.request.prompt_tokens
            if chosen and tokens + cost > self.prefill_token_budget:
                break
            chosen.append(job)
            taken.add(id(job))
            tokens += cost
        self._waiting = deque(job for job in self._waiting if id(job) not in taken)
        if not chosen:
            return
        first_slot = len(self._active)
        started = time.monotonic()
        for job in chosen:
            job.started_at = started
            job.batch_size = len(chosen)
        self._outbox.started.extend(chosen)
        self._flush()  # their places in the queue are free from now, not from the end of the prefill
        self._active.extend(chosen)
        entries = [(first_slot + index, job) for index, job in enumerate(chosen)]
        self._prefill_isolating(entries)
        took = time.monotonic() - started
        self._prefill_s = took if self._prefill_s == 0 else 0.8 * self._prefill_s + 0.2 * took
        self._metrics.prefill_seconds.observe(took)
        done = []
        for slot, job in entries:
            if job.failure is None:
                self._metrics.time_to_first_token.observe(job.first_token_at - job.submitted_at)
                if self._finished(job):
                    done.append(slot)
            else:
                done.append(slot)
        self._retire(done)

    def _score(self, job: _Job) -> None:
        """A scoring request runs on its own, between steps, and holds no slot."""
        job.started_at = time.monotonic()
        job.batch_size = 1
        self._outbox.started.append(job)
        try:
            job.scores = self._runner.score(job.request)
        except Exception as exc:
            if self._is_fatal(exc):
                raise
            logger.warning("scoring failed for one request: %s", type(exc).__name__)
            job.failure = BatchFailedError("scoring failed for this request")
            job.failure.__cause__ = exc
        job.retired = True
        self._outbox.ended.append(job)

    def _prefill_isolating(self, entries: list[tuple[int, _Job]]) -> None:
        """Prefill; if it fails, split the group to find the request that fails and still start the rest."""
        for _, job in entries:
            constraint = job.request.options.constraint
            job.matcher = constraint.matcher() if constraint is not None else None
        masks = [(slot, job.matcher) for slot, job in entries if job.matcher is not None]
        try:
            firsts = self._runner.prefill([(slot, job.request) for slot, job in entries], masks)
        except Exception as exc:
            if self._is_fatal(exc):
                raise
            if len(entries) == 1:
                logger.warning("prefill failed for one request: %s", type(exc).__name__)
                failure = BatchFailedError("generation failed for this request")
                failure.__cause__ = exc
                entries[0][1].failure = failure
                return
            middle = len(entries) // 2
            self._prefill_isolating(entries[:middle])
            self._prefill_isolating(entries[middle:])
            return
        now = time.monotonic()
        for row, (_, job) in enumerate(entries):
            job.first_token_at = now
            self._emit(job, firsts, row)

    def _decode(self) -> None:
        """One step ahead: launch the next step for the running requests, then read the previous step's
        tokens while the device works on it. A request that ended in the previous step has run one step
        more in the new one; that token is dropped, and its slot is given up now."""
        launched = None
        masks = [(row, job.matcher) for row, job in enumerate(self._active) if job.matcher is not None]
        if masks and self._launched is not None:
            # A grammar says what may come next only once it has taken the previous token: while a
            # constrained request runs, each step waits for the one before it to be read.
            waited_for, self._launched = self._launched, None
            self._read(*waited_for)
            masks = [(row, job.matcher) for row, job in enumerate(self._active) if job.matcher is not None]
        active = len(self._active)
        if active:
            try:
                self._runner.launch(active, masks)
            except Exception as exc:
                if self._is_fatal(exc):
                    raise
                self._fail_running(exc)
            else:
                launched = (list(self._active), time.monotonic())
                for job in self._active:
                    job.batch_size = max(job.batch_size, active)
        previous, self._launched = self._launched, launched
        if previous is not None:
            self._read(*previous)

    def _read(self, rows: list[_Job], began: float) -> None:
        """A launched step's tokens, each to the request that held its row when the step was launched."""
        try:
            tokens = self._runner.collect()
        except Exception as exc:
            if self._is_fatal(exc):
                raise
            self._fail_running(exc)
            return
        self._metrics.decode_step_seconds.observe(time.monotonic() - began)
        for row, job in enumerate(rows):
            if not job.retired:
                self._emit(job, tokens, row)
        self._retire([row for row, job in enumerate(self._active) if job.tokens and self._finished(job)])

    def _fail_running(self, exc: Exception) -> None:
        logger.warning("a decode step failed for %d requests: %s", len(self._active), type(exc).__name__)
        for job in self._active:
            job.failure = BatchFailedError("generation failed for this request")
            job.failure.__cause__ = exc
        self._retire(list(range(len(self._active))))
        if self._launched is not None:  # a step launched before the failure: nothing of it is read
            self._runner.collect()
            self._launched = None

    def _emit(self, job: _Job, chosen: Chosen, row: int) -> None:
        token = chosen.tokens[row]
        job.tokens.append(token)
        logprobs = None
        asked = job.request.options.logprobs
        taken = chosen.logprobs_of(row, asked) if asked is not None else None
        if taken is not None:
            logprobs = (taken,)
            if job.logprobs is None:
                job.logprobs = []
            job.logprobs.extend(logprobs)
        if job.matcher is not None and token not in self._eos:
            job.matcher.accept(token)
        if job.deltas:
            self._outbox.events.append((job, TokenDelta((token,), logprobs)))

    def _finished(self, job: _Job) -> bool:
        return job.tokens[-1] in self._eos or len(job.tokens) >= job.request.options.max_new_tokens

    def _retire(self, rows: Sequence[int]) -> None:
        """Free the slots of these rows; the last running request moves into each freed slot."""
        for row in sorted(rows, reverse=True):
            job = self._active[row]
            job.retired = True
            last = len(self._active) - 1
            if row != last:
                self._runner.move(last, row)
                self._active[row] = self._active[last]
            else:
                self._runner.release(row)
            self._active.pop()
            self._outbox.ended.append(job)

    def _fail_everything(self, error: BaseException) -> None:
        self._take_arrivals()
        for job in self._waiting:
            self._outbox.refused.append((job, error))
        self._waiting.clear()
        for job in self._active:
            job.failure = error
            job.retired = True
            self._outbox.ended.append(job)
        self._active.clear()
        self._launched = None
        self._metrics.running_requests.set(0)
        self._metrics.waiting_requests.set(0)
        self._metrics.slot_occupancy.set(0)

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, _Outbox()
            self._post(self._deliver, outbox)

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _died(self, exc: BaseException, outbox: _Outbox) -> None:
        """On the event loop, once the scheduler thread has ended: nothing submitted from now on can run.

        The engine is marked dead before its requests learn that they failed, so that whoever sees a 503
        for them also sees the probes turned red.
        """
        self.gate.die(exc)
        self._deliver(outbox)
        with self._lock:
            stranded, self._inbox = list(self._inbox), deque()
        for job in stranded:
            job.mailbox.put_nowait(
                WorkerDiedError("the inference worker has stopped; the service must be restarted")
            )


class JobStream:
    """A submitted request's events, read from its mailbox on the event loop."""

    def __init__(self, engine: ContinuousEngine, job: _Job) -> None:
        self._engine = engine
        self._job = job

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        job, metrics = self._job, self._engine._metrics
        try:
            while True:
                event = await _next_event(job.mailbox, job.deadline)
                if isinstance(event, BaseException):
                    if isinstance(event, DeadlineExceededError):
                        metrics.rejections.labels(reason="deadline").inc()
                    raise event
                yield event
                if isinstance(event, Completed):
                    return
        finally:
            # However the stream ended early (deadline, a client gone, cancellation), the scheduler stops
            # working on it at its next iteration, and its place in the queue is given back.
            await self.aclose()

    async def aclose(self) -> None:
        if not self._job.abandoned:
            self._engine.abandon(self._job)


async def _next_event(
    mailbox: asyncio.Queue[StreamEvent | BaseException], deadline: float
) -> StreamEvent | BaseException:
    """The next event in a request's mailbox, or DeadlineExceededError once `deadline` (monotonic) passes.

    asyncio.timeout rather than wait_for: on Python 3.11, wait_for returns an event that arrives in the
    same loop iteration as a cancellation and drops the cancellation, so a cancelled reader (a client gone,
    a server stopping) would read on.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return DeadlineExceededError()
    try:
        async with asyncio.timeout(remaining):
            return await mailbox.get()
    except TimeoutError:
        return DeadlineExceededError()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
