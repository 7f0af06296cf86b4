"""The continuous engine on the real runtime and slot runner (float32), held to generate() alone.

Arrivals are staggered so that requests really join a running batch and leave it early; the tests check
that they did, from the runner's own log of prefills and decode steps. Every test runs on the CPU, and again
on a CUDA or ROCm GPU where there is one, there with the decode step replayed from captured graphs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.conversation import Captioned, Conversation, Turn
from app.engine.continuous import ContinuousEngine, _next_event
from app.engine.protocol import (
    BatchFailedError,
    Completed,
    ContextTooLongError,
    DeadlineExceededError,
    NotAcceptingError,
    StreamEvent,
    TokenDelta,
    complete,
)
from app.engine.request import GenerationOptions, PreparedRequest
from app.engine.runtime import ModelRuntime
from app.engine.slots import SlotRunner
from app.metrics import Metrics
from app.settings import Settings
from tests.conftest import README_GROUNDING_REPLY, rgb_image
from tests.instrumented import InstrumentedRunner

PROMPTS = [
    "Is there a pleural effusion?",
    "Generate a detailed radiology report based on the given medical image.",
    "Detect any visible diseases or abnormalities in this image.",
    "What is the modality?",
    "Describe the heart size.",
    "Any fracture?",
    "Is the tube in a good position?",
]
SIZES = [(96, 64), (200, 120), (64, 160), (320, 320), (128, 128), (300, 90), (80, 240)]
LIMITS = [30, 6, 50, 1, 20, 4, 40]


DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA or ROCm GPU here")
    ),
]


@pytest.fixture(scope="module", params=DEVICES)
def runtime(request: pytest.FixtureRequest, random_checkpoint: Path) -> ModelRuntime:
    # float32 everywhere: in reduced precision a batch and a request alone round differently.
    return ModelRuntime.load(Settings(model=str(random_checkpoint), device=request.param, dtype="float32"))


def prepare(runtime: ModelRuntime, index: int, max_new_tokens: int) -> PreparedRequest:
    width, height = SIZES[index % len(SIZES)]
    picture = rgb_image(width, height, seed=index)
    return runtime.prepare(
        Conversation.about(picture, PROMPTS[index % len(PROMPTS)]), GenerationOptions(max_new_tokens)
    )


@asynccontextmanager
async def running(
    runtime: ModelRuntime, *, slots: int = 3, context: int = 2048, budget: int = 8192
) -> AsyncIterator[tuple[ContinuousEngine, InstrumentedRunner]]:
    # Graphs where the device has them (captured when the engine starts); the CPU decodes eagerly.
    runner = InstrumentedRunner(SlotRunner(runtime.model, slots=slots, context=context, graphs=True))
    engine = ContinuousEngine(runner, runtime, max_queue=64, prefill_token_budget=budget, metrics=Metrics())
    await engine.start()
    try:
        yield engine, runner
    finally:
        await engine.stop()


async def run(engine: ContinuousEngine, request: PreparedRequest, timeout_s: float = 120) -> Completed:
    with engine.admit() as admission:
        return await complete(engine, admission, request, deadline_s=time.monotonic() + timeout_s)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.001)


async def test_tokens_equal_generate_alone_while_requests_join_and_leave(runtime: ModelRuntime) -> None:
    requests = [prepare(runtime, index, limit) for index, limit in enumerate(LIMITS)]
    alone = [runtime.generate([request])[0] for request in requests]
    async with running(runtime, slots=3) as (engine, runner):
        tasks = []
        for request in requests:
            tasks.append(asyncio.create_task(run(engine, request)))
            steps = len(runner.decodes)
            await wait_until(lambda steps=steps: len(runner.decodes) >= steps + 3 or engine.in_flight == 0)
        results = await asyncio.gather(*tasks)
    assert [r.generation for r in results] == alone
    assert [len(r.generation.token_ids) for r in results] == LIMITS  # the random weights never stop early
    if runtime.model.device.type == "cuda":  # and those tokens came from graph replays
        assert runner.inner.graph_note.endswith("span buckets)"), runner.inner.graph_note
    # Requests joined while others were decoding (a prefill into a slot above 0) ...
    assert any(min(slots) > 0 for slots in runner.prefill_slots)
    # ... and left while others went on (fewer rows than the step before, but not none).
    assert any(0 < now < before for before, now in zip(runner.decodes, runner.decodes[1:], strict=False))
    # ... and some waited for a slot: more requests than slots were in flight.
    assert max(len(slots) + min(slots) for slots in runner.prefill_slots) == 3


CAPTIONS = ["frontal", "lateral", "prior, 2025-03-02", "slice 41 of 80", None, "axial"]


def study(runtime: ModelRuntime, images: int, seed: int, max_new_tokens: int) -> PreparedRequest:
    """A request of several captioned images of different sizes (and one left uncaptioned in six)."""
    pictures = [
        Captioned(
            rgb_image(*SIZES[(seed + n) % len(SIZES)], seed=100 * seed + n), CAPTIONS[n % len(CAPTIONS)]
        )
        for n in range(images)
    ]
    conversation = Conversation.asking(pictures, PROMPTS[seed % len(PROMPTS)])
    return runtime.prepare(conversation, GenerationOptions(max_new_tokens))


def text_only(runtime: ModelRuntime, seed: int, max_new_tokens: int, *, turns: int = 1) -> PreparedRequest:
    """A conversation without images: a system message, then `turns` user turns with answers between."""
    parts = [Turn("system", ("You are a medical imaging expert.",))]
    for turn in range(turns):
        if turn:
            parts.append(Turn("assistant", ("No acute cardiopulmonary process.",)))
        parts.append(Turn("user", (f"Summarize this report: {PROMPTS[(seed + turn) % len(PROMPTS)]}",)))
    return runtime.prepare(Conversation(tuple(parts)), GenerationOptions(max_new_tokens))


async def test_studies_and_text_alone_equal_generate_alone_and_mixed_with_single_images(
    runtime: ModelRuntime,
) -> None:
    requests = [
        study(runtime, 2, 0, 12),
        prepare(runtime, 1, 9),
        study(runtime, 3, 1, 20),
        text_only(runtime, 2, 15),
        study(runtime, 6, 3, 7),
        prepare(runtime, 4, 25),
        text_only(runtime, 5, 10, turns=2),
    ]
    assert [len(r.model_input_sizes) for r in requests] == [2, 1, 3, 0, 6, 1, 0]
    assert len({size for r in requests for size in r.model_input_sizes}) > 3  # images of different sizes
    alone = [runtime.generate([request])[0] for request in requests]
    async with running(runtime, slots=5, context=4096) as (engine, runner):
        # Each alone through the engine ...
        for request, expected in zip(requests, alone, strict=True):
            assert (await run(engine, request)).generation == expected
        # ... and all together, arriving while a short request holds the scheduler in its prefill: the
        # first four packed in the next prefill, the rest joining the running batch as slots free.
        runner.gate.clear()
        runner.inside.clear()
        blocker = asyncio.create_task(run(engine, prepare(runtime, 6, 3)))
        await asyncio.to_thread(runner.inside.wait, 10)
        runner.prefills.clear()
        runner.decodes.clear()
        tasks = [asyncio.create_task(run(engine, request)) for request in requests]
        await wait_until(lambda: engine.waiting == len(requests))
        runner.gate.set()
        results = await asyncio.gather(*tasks)
        await blocker
    assert [r.generation for r in results] == alone
    kinds = [[len(r.model_input_sizes) for r in group] for group in runner.prefills]
    assert kinds[1] == [2, 1, 3, 0]  # multi-image, single-image and text-only prompts in one forward
    assert sorted(n for group in kinds[2:] for n in group) == [0, 1, 6]  # the others joined later
    assert max(runner.decodes) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA or ROCm GPU here")
async def test_bfloat16_on_cuda_starts_every_answer_as_generate_does(random_checkpoint: Path) -> None:
    """What serves on a GPU: bfloat16 and captured graphs. Batched bf16 rounds differently from a request
    alone, so argmax may flip where two tokens are within rounding: the first tokens must agree, and how
    far the rest agree is reported."""
    runtime = ModelRuntime.load(Settings(model=str(random_checkpoint), device="cuda", dtype="bfloat16"))
    requests = [prepare(runtime, index, 30) for index in range(len(PROMPTS))]
    alone = [runtime.generate([request])[0].token_ids for request in requests]
    async with running(runtime, slots=3) as (engine, runner):
        results = await asyncio.gather(*(run(engine, request) for request in requests))
    served = [result.generation.token_ids for result in results]
    assert runner.inner.graph_note.endswith("span buckets)"), runner.inner.graph_note
    assert [tokens[0] for tokens in served] == [tokens[0] for tokens in alone]
    same = sum(
        a == b for one, other in zip(served, alone, strict=True) for a, b in zip(one, other, strict=False)
    )
    print(f"bfloat16: {same} of {sum(map(len, alone))} tokens as generate() alone gives them")


async def test_an_end_of_turn_token_ends_the_request_as_generate_does(
    reply_checkpoint: Callable[[str], Path],
) -> None:
    runtime = ModelRuntime.load(Settings(model=str(reply_checkpoint(README_GROUNDING_REPLY))))
    requests = [prepare(runtime, index, 16) for index in range(3)]
    async with running(runtime) as (engine, _):
        results = await asyncio.gather(*(run(engine, request) for request in requests))
    for result, request in zip(results, requests, strict=True):
        assert result.generation == runtime.generate([request])[0]
        assert result.generation.text == README_GROUNDING_REPLY
        assert result.generation.finish_reason == "stop"
        assert result.generation.completion_tokens == 2  # the reply, then the end of the turn


async def test_short_work_is_not_held_by_long_work(runtime: ModelRuntime) -> None:
    report = prepare(runtime, 1, 1000)
    short = prepare(runtime, 0, 8)
    short_alone = runtime.generate([short])[0]
    async with running(runtime, slots=2) as (engine, runner):
        long_work = asyncio.create_task(run(engine, report))
        await wait_until(lambda: len(runner.decodes) >= 20)
        answered = await run(engine, short)
        # The report decodes in every step, so the steps so far are its tokens so far: the clock here.
        report_tokens_when_answered = 1 + len(runner.decodes)
        finished = await long_work
    assert answered.generation == short_alone
    assert finished.generation.completion_tokens == 1000
    assert report_tokens_when_answered < 1000 / 4
    assert answered.inference_s < finished.inference_s / 4


async def test_a_stream_closed_mid_decoding_frees_its_slot_at_the_next_step(runtime: ModelRuntime) -> None:
    async with running(runtime) as (engine, runner):
        with engine.admit() as admission:
            async with aclosing(
                engine.submit(admission, prepare(runtime, 1, 1500), deadline_s=time.monotonic() + 300)
            ) as events:
                seen = 0
                async for _ in events:
                    seen += 1
                    if seen == 10:
                        break
            steps_at_close = len(runner.decodes)
        await wait_until(lambda: engine.running == 0)
        assert len(runner.decodes) - steps_at_close <= 2
        assert len(runner.decodes) < 100  # nowhere near the 1500 tokens it asked for
        assert runner.inner.lengths == [0, 0, 0]
        assert (await run(engine, prepare(runtime, 3, 5))).generation.completion_tokens == 5


class FailsToFinish:
    """The real runtime, except that turning one request's tokens into text fails."""

    def __init__(self, inner: ModelRuntime, poisoned: PreparedRequest) -> None:
        self.inner = inner
        self.poisoned = poisoned

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def finish(self, request: PreparedRequest, tokens: Any, logprobs: Any = None) -> Any:
        if request is self.poisoned:
            raise RuntimeError("these tokens cannot be decoded")
        return self.inner.finish(request, tokens, logprobs)


async def test_a_request_whose_text_cannot_be_made_fails_alone(runtime: ModelRuntime) -> None:
    # The three finish in the same step, so their results are delivered together.
    requests = [prepare(runtime, index, 4) for index in range(3)]
    runner = InstrumentedRunner(SlotRunner(runtime.model, slots=3, context=2048, graphs=True))
    engine = ContinuousEngine(
        runner,
        FailsToFinish(runtime, requests[1]),
        max_queue=64,
        prefill_token_budget=8192,
        metrics=Metrics(),
    )
    await engine.start()
    try:
        results = await asyncio.gather(
            *(run(engine, request, timeout_s=20) for request in requests), return_exceptions=True
        )
    finally:
        await engine.stop()
    first, failed, last = results
    assert isinstance(failed, BatchFailedError)
    assert isinstance(first, Completed)
    assert isinstance(last, Completed)
    assert [first.generation, last.generation] == [runtime.generate([requests[i]])[0] for i in (0, 2)]
    assert engine.running == 0


async def test_a_reader_cancelled_as_its_tokens_arrive_stops_reading() -> None:
    # The tokens and the cancellation land in the same loop iteration, as when a closed-loop client is
    # cancelled under load. asyncio.wait_for on Python 3.11 returned the tokens and lost the cancellation:
    # the reader went on (and a cancelled client loop submitted its next request, so it never ended).
    mailbox: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
    reader = asyncio.create_task(_next_event(mailbox, time.monotonic() + 60))
    await asyncio.sleep(0)  # the reader waits on its mailbox
    mailbox.put_nowait(TokenDelta((1, 2)))
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert mailbox.qsize() == 1  # the tokens were not taken


async def test_a_deadline_passing_mid_decoding_frees_the_slot(runtime: ModelRuntime) -> None:
    async with running(runtime) as (engine, runner):
        with engine.admit() as admission, pytest.raises(DeadlineExceededError):
            await complete(engine, admission, prepare(runtime, 1, 1900), deadline_s=time.monotonic() + 0.5)
        await wait_until(lambda: engine.running == 0)
        steps = len(runner.decodes)
        await asyncio.sleep(0.1)
        assert len(runner.decodes) == steps  # nothing is decoding any more


async def test_a_burst_of_prompts_is_spread_over_steps_by_the_token_budget(runtime: ModelRuntime) -> None:
    requests = [prepare(runtime, index, 6) for index in range(3)]
    budget = max(r.prompt_tokens for r in requests)  # one prompt per step
    async with running(runtime, budget=budget) as (engine, runner):
        runner.gate.clear()
        tasks = [asyncio.create_task(run(engine, request)) for request in requests]
        await wait_until(lambda: engine.waiting == 3 or runner.inside.is_set())
        await asyncio.sleep(0.1)
        runner.gate.set()
        await asyncio.gather(*tasks)
    assert [len(group) for group in runner.prefills] == [1, 1, 1]
    assert runner.decodes[:2] == [1, 2]  # decoding went on between the prefills


async def test_a_request_longer_than_the_context_is_refused_before_it_queues(runtime: ModelRuntime) -> None:
    async with running(runtime, context=256) as (engine, runner):
        request = prepare(runtime, 0, 256)
        with pytest.raises(ContextTooLongError, match="256-token context"):
            await run(engine, request)
        assert engine.in_flight == 0
    assert runner.prefills == []


async def test_a_request_that_fills_the_context_runs_to_its_end_beside_others(runtime: ModelRuntime) -> None:
    # The scheduler launches a step ahead of reading the one before, so a request that ends at its limit has
    # run one step more, written one position past its last token: the context holds that position too.
    async with running(runtime, context=512) as (engine, _):
        request = prepare(runtime, 0, 1)
        filling = request.limited_to(512 - request.prompt_tokens)
        with pytest.raises(ContextTooLongError):
            await run(engine, request.limited_to(512 - request.prompt_tokens + 1))
        beside = prepare(runtime, 1, 300)
        results = await asyncio.gather(run(engine, filling), run(engine, beside))
    assert [r.generation.completion_tokens for r in results] == [512 - request.prompt_tokens, 300]
    assert results[0].generation == runtime.generate([filling])[0]


async def test_stopping_fails_what_is_running_and_waiting(runtime: ModelRuntime) -> None:
    async with running(runtime, slots=1) as (engine, runner):
        runner.gate.clear()
        tasks = [asyncio.create_task(run(engine, prepare(runtime, i, 50))) for i in range(2)]
        await asyncio.to_thread(runner.inside.wait, 10)
        await wait_until(lambda: engine.waiting == 1)
        stopping = asyncio.create_task(engine.stop())
        await asyncio.sleep(0.05)
        runner.gate.set()
        await stopping
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        registry = engine._metrics.registry  # what /metrics shows after the stop
    assert all(isinstance(outcome, NotAcceptingError) for outcome in outcomes)
    for gauge in ("medmo_running_requests", "medmo_waiting_requests", "medmo_slot_occupancy"):
        assert registry.get_sample_value(gauge) == 0, gauge


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Ops that wait for the device (a value read back, a shape that depends on data) or bring a new tensor from
# the host:
# inside a CUDA graph capture each of them fails or is frozen into the graph.
HOST_BOUND = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "lift_fresh"}


def test_the_decode_step_never_waits_for_the_device_so_graphs_can_capture_it(runtime: ModelRuntime) -> None:
    runner = SlotRunner(runtime.model, slots=4, context=1024, graphs=False)
    with torch.inference_mode():
        runner.prefill([(slot, prepare(runtime, slot, 8)) for slot in range(3)])
        log = OpLog()
        with log:
            runner._step(4, 512)
    assert "scaled_dot_product_attention" in " ".join(log.ops)  # the step really ran the model
    assert not HOST_BOUND & set(log.ops), sorted(HOST_BOUND & set(log.ops))


async def test_arrivals_gather_into_one_prefill_while_others_decode(runtime: ModelRuntime) -> None:
    requests = [prepare(runtime, index, 5) for index in (2, 3, 4)]
    async with running(runtime, slots=16) as (engine, runner):
        long_work = asyncio.create_task(run(engine, prepare(runtime, 1, 400)))
        await wait_until(lambda: len(runner.decodes) >= 5)
        arrivals = []
        for request in requests:  # a few milliseconds apart: well inside two prefills' time
            arrivals.append(asyncio.create_task(run(engine, request)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*arrivals)
        alone = await run(engine, prepare(runtime, 5, 5))  # a lone arrival is started too, if later
        await long_work
    assert [len(group) for group in runner.prefills] == [1, 3, 1]
    assert alone.generation.completion_tokens == 5
