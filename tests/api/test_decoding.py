"""A request abandoned while its upload is being decoded tells the decoding thread, which stops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.requests import Request
from starlette.types import Message

import app.api.pipeline
from app.api.errors import ApiError
from app.api.pipeline import ImageUpload, decode_upload
from app.imaging import Cancellation, DecodedImage, DecodingCancelledError, ImageLimits

LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)


class DecoderThatWaitsToBeStopped:
    """Stands in for decode_image's slow middle: it runs until told to stop, as decode_image's steps do."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancellations: list[Cancellation] = []
        self.stopped = threading.Event()

    def __call__(
        self,
        data: bytes,
        limits: ImageLimits,
        *,
        frame: int | None,
        window: str | None,
        cancellation: Cancellation,
    ) -> DecodedImage:
        self.cancellations.append(cancellation)
        self.started.set()
        give_up = time.monotonic() + 10
        try:
            while time.monotonic() < give_up:
                cancellation.check()
                time.sleep(0.001)
        except DecodingCancelledError:
            self.stopped.set()
            raise
        raise AssertionError("nobody told the decoder its request was abandoned")


@pytest.fixture
def decoder(monkeypatch: pytest.MonkeyPatch) -> DecoderThatWaitsToBeStopped:
    waiting = DecoderThatWaitsToBeStopped()
    monkeypatch.setattr(app.api.pipeline, "decode_image", waiting)
    return waiting


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as executor:
        yield executor


def request_whose_client(disconnects: asyncio.Event) -> Request:
    async def receive() -> Message:
        await disconnects.wait()
        return {"type": "http.disconnect"}

    return Request({"type": "http", "method": "POST", "path": "/vqa", "headers": []}, receive)


async def test_a_deadline_that_passes_mid_decode_stops_the_decoder(
    decoder: DecoderThatWaitsToBeStopped, pool: ThreadPoolExecutor
) -> None:
    request = request_whose_client(asyncio.Event())  # the client stays
    decoding = asyncio.ensure_future(decode_upload(request, pool, ImageUpload(b"bytes"), LIMITS))
    assert await asyncio.to_thread(decoder.started.wait, 10)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):  # the request's deadline, as the routes set it
            await decoding
    assert await asyncio.to_thread(decoder.stopped.wait, 10)
    assert decoder.cancellations[0].cancelled


async def test_a_client_that_leaves_mid_decode_stops_the_decoder(
    decoder: DecoderThatWaitsToBeStopped, pool: ThreadPoolExecutor
) -> None:
    disconnects = asyncio.Event()
    decoding = asyncio.ensure_future(
        decode_upload(request_whose_client(disconnects), pool, ImageUpload(b"bytes"), LIMITS)
    )
    assert await asyncio.to_thread(decoder.started.wait, 10)
    disconnects.set()
    with pytest.raises(ApiError) as gone:
        await decoding
    assert gone.value.status == 499
    assert await asyncio.to_thread(decoder.stopped.wait, 10)
