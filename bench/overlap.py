"""The continuous engine's host gap: how long the device would idle per step while the scheduler works.

    python -m bench.overlap --rows 64 --step-ms 10

A stand-in device (no model) takes `--step-ms` per decode step, either the way a GPU does (a step runs
while the host goes on, and reading its tokens waits for it) or blocking the caller for the whole step (a
device with nothing to overlap). The real scheduler runs `--rows` requests that never end their turn, with
readers taking every token on the event loop as streamed answers do. What one step costs the loop, over
the step itself, is the time the device idles per step: the scheduler's own work (retiring, delivering,
bookkeeping) when it is not overlapped with the step. Printed for both, with the ratio of step time to
loop time, measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence

import torch

from app.engine.continuous import ContinuousEngine
from app.engine.protocol import Completed
from app.engine.request import Generation, GenerationOptions, PreparedRequest, TokenLogprobs, TokenMatcher
from app.engine.sampling import Chosen
from app.metrics import Metrics

TOKEN = 7  # never an end of turn: every request runs to its limit


class StandInDevice:
    """A runner whose decode step takes `step_s`: overlapped with the host (`overlapped`), or blocking it."""

    def __init__(self, slots: int, step_s: float, overlapped: bool) -> None:
        self.slots = slots
        self.context = 1 << 20
        self.step_s = step_s
        self.overlapped = overlapped
        self.steps = 0
        self._ends: list[tuple[float, int]] = []

    @property
    def graphs_replaying(self) -> int:
        return 0

    def warm_up(self) -> None:
        pass

    def prefill(
        self, entries: Sequence[tuple[int, PreparedRequest]], masks: Sequence[tuple[int, TokenMatcher]] = ()
    ) -> Chosen:
        return Chosen([TOKEN] * len(entries))

    def launch(self, active: int, masks: Sequence[tuple[int, TokenMatcher]] = ()) -> None:
        if not self.overlapped:
            time.sleep(self.step_s)
            self._ends.append((time.monotonic(), active))
        else:
            # A device runs its steps one after another: this one starts when the one before it ends.
            previous = self._ends[-1][0] if self._ends else 0.0
            self._ends.append((max(time.monotonic(), previous) + self.step_s, active))
        self.steps += 1

    def collect(self) -> Chosen:
        ends, active = self._ends.pop(0)
        wait = ends - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return Chosen([TOKEN] * active)

    def score(self, request: PreparedRequest) -> tuple[float, ...]:
        raise NotImplementedError("the stand-in device only decodes")

    def move(self, source: int, target: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {"slots": self.slots}


class Finisher:
    eos_token_ids = frozenset({0})

    def finish(
        self, request: PreparedRequest, tokens: Sequence[int], logprobs: Sequence[TokenLogprobs] | None = None
    ) -> Generation:
        return Generation(
            text="", token_ids=tuple(tokens), prompt_tokens=request.prompt_tokens, finish_reason="length"
        )


def request(max_new_tokens: int) -> PreparedRequest:
    return PreparedRequest(
        features={"input_ids": torch.zeros((1, 64), dtype=torch.long)},
        model_input_sizes=(),
        options=GenerationOptions(max_new_tokens),
        rope_positions=torch.zeros((3, 64), dtype=torch.long),
        rope_delta=0,
    )


async def loop_period(rows: int, step_s: float, overlapped: bool, steps: int) -> float:
    """Seconds per decode step, over `steps` steps of `rows` running requests."""
    device = StandInDevice(rows, step_s, overlapped)
    engine = ContinuousEngine(
        device, Finisher(), max_queue=4 * rows, prefill_token_budget=1 << 20, metrics=Metrics()
    )
    await engine.start()

    async def read(stream_of: PreparedRequest) -> None:
        with engine.admit() as admission:
            async for event in engine.submit(admission, stream_of, deadline_s=time.monotonic() + 3600):
                if isinstance(event, Completed):
                    return

    readers = [asyncio.create_task(read(request(steps * 4))) for _ in range(rows)]
    try:
        await steps_done(device, 10)  # every request started, the loop in its stride
        began, first = time.monotonic(), device.steps
        await steps_done(device, first + steps)
        return (time.monotonic() - began) / (device.steps - first)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await engine.stop()


async def steps_done(device: StandInDevice, count: int) -> None:
    """Poll, as an observer: the steps are counted on the scheduler's thread."""
    while device.steps < count:  # noqa: ASYNC110 - the count changes on another thread, no event to await
        await asyncio.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    step_s = args.step_ms / 1000
    print(f"{args.rows} rows, a {args.step_ms:g} ms step, {args.steps} steps each; measured in this run\n")
    print(f"{'device':<12}{'loop ms/step':>14}{'host gap ms':>13}{'step / loop':>13}")
    for overlapped in (False, True):
        period = asyncio.run(loop_period(args.rows, step_s, overlapped, args.steps))
        name = "overlapped" if overlapped else "blocking"
        print(f"{name:<12}{period * 1000:>14.3f}{(period - step_s) * 1000:>13.3f}{step_s / period:>13.3f}")


if __name__ == "__main__":
    main()
