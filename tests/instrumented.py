"""The real runtime and the real slot runner with instruments around them: a gate in front of the model's
work, a log of what it was given, and a fault to inject."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from app.engine.request import Generation, PreparedRequest, TokenMatcher
from app.engine.runtime import ModelRuntime
from app.engine.sampling import Chosen
from app.engine.slots import SlotRunner


class Gated:
    """A gate the model's work waits at, a record that it was reached, and an optional fault to raise there."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()  # set once the model's work has been reached
        self.fault: BaseException | None = None
        self.poisoned: Callable[[PreparedRequest], bool] = lambda _: False

    def enter(self) -> None:
        self.inside.set()
        assert self.gate.wait(30), "the test never opened the gate"

    def fail_if_asked(self, requests: Iterable[PreparedRequest]) -> None:
        if self.fault is not None:
            raise self.fault
        if any(self.poisoned(request) for request in requests):
            raise RuntimeError("this request cannot be computed")


class InstrumentedRuntime(Gated):
    """For the generate engine: the gate is in front of each generate() call."""

    def __init__(self, inner: ModelRuntime) -> None:
        super().__init__()
        self.inner = inner
        self.description = inner.description
        self.model = inner.model
        self.eos_token_ids = inner.eos_token_ids
        self.batches: list[list[PreparedRequest]] = []

    def __getattr__(self, name: str) -> Any:
        # Preparing, decoding text: the real runtime's, uninstrumented.
        return getattr(self.inner, name)

    def generate(self, batch: Sequence[PreparedRequest]) -> list[Generation]:
        self.enter()
        self.batches.append(list(batch))
        self.fail_if_asked(batch)
        return self.inner.generate(batch)

    @property
    def computed(self) -> int:
        """Requests the model worked on."""
        return sum(len(batch) for batch in self.batches)


class InstrumentedRunner(Gated):
    """For the continuous engine: the gate is in front of each prefill and decode step."""

    def __init__(self, inner: SlotRunner) -> None:
        super().__init__()
        self.inner = inner
        self.slots = inner.slots
        self.context = inner.context
        self.prefills: list[list[PreparedRequest]] = []
        self.prefill_slots: list[list[int]] = []
        self.decodes: list[int] = []  # rows of each decode step launched
        self.scored: list[PreparedRequest] = []

    def warm_up(self) -> None:
        self.inner.warm_up()

    @property
    def graphs_replaying(self) -> int:
        return self.inner.graphs_replaying

    def prefill(
        self, entries: Sequence[tuple[int, PreparedRequest]], masks: Sequence[tuple[int, TokenMatcher]] = ()
    ) -> Chosen:
        self.enter()
        self.prefills.append([request for _, request in entries])
        self.prefill_slots.append([slot for slot, _ in entries])
        self.fail_if_asked(request for _, request in entries)
        return self.inner.prefill(entries, masks)

    def launch(self, active: int, masks: Sequence[tuple[int, TokenMatcher]] = ()) -> None:
        self.enter()
        self.decodes.append(active)
        self.fail_if_asked(())
        self.inner.launch(active, masks)

    def collect(self) -> Chosen:
        return self.inner.collect()

    def score(self, request: PreparedRequest) -> tuple[float, ...]:
        self.enter()
        self.scored.append(request)
        self.fail_if_asked([request])
        return self.inner.score(request)

    def move(self, source: int, target: int) -> None:
        self.inner.move(source, target)

    def release(self, slot: int) -> None:
        self.inner.release(slot)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    @property
    def computed(self) -> int:
        """Requests the model worked on."""
        return sum(len(group) for group in self.prefills)
