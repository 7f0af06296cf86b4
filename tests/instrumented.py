"""The real runtime with instruments around it: a gate in front of generate(), and a log of batches."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from PIL import Image

from app.engine.runtime import Generation, GenerationOptions, ModelRuntime, PreparedRequest


class InstrumentedRuntime:
    def __init__(self, inner: ModelRuntime) -> None:
        self.inner = inner
        self.description = inner.description
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()  # set once a batch has entered generate()
        self.batches: list[list[PreparedRequest]] = []
        self.fault: BaseException | None = None

    def prepare(self, picture: Image.Image, prompt: str, options: GenerationOptions) -> PreparedRequest:
        return self.inner.prepare(picture, prompt, options)

    def generate(self, batch: Sequence[PreparedRequest]) -> list[Generation]:
        self.inside.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.batches.append(list(batch))
        if self.fault is not None:
            raise self.fault
        return self.inner.generate(batch)

    @property
    def computed(self) -> int:
        return sum(len(batch) for batch in self.batches)
