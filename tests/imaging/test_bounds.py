"""Inflation that stops at its bound, and decoding that stops when its request is abandoned."""

from __future__ import annotations

import tracemalloc
import zlib

import pytest

from app.imaging import (
    Cancellation,
    DecodingCancelledError,
    ImageLimits,
    ImageTooLargeError,
    UnreadableImageError,
    decode_image,
)
from app.imaging.bounds import inflate_raw
from tests.conftest import png_bytes
from tests.corpus import MIB, deflated, part10, synthetic_ct, zeros_deflate_stream


def inflate(stream: bytes, max_bytes: int = 64 * MIB, cancellation: Cancellation | None = None) -> bytes:
    inflated = inflate_raw(
        stream, max_bytes=max_bytes, cancellation=cancellation or Cancellation(), what="it"
    )
    return inflated.getvalue()


def test_a_stream_inflates_to_what_zlib_gives() -> None:
    data = bytes(range(251)) * 13_000  # 3 MB: several steps of output
    assert inflate(deflated(data)) == zlib.decompress(deflated(data), -zlib.MAX_WBITS) == data
    assert inflate(deflated(data), max_bytes=len(data)) == data  # exactly at the bound is allowed


def test_a_bomb_is_refused_after_at_most_its_bound_of_output() -> None:
    bomb = zeros_deflate_stream(b"", 1024 * MIB)  # 1 MB that inflates to 1 GiB
    bound = 8 * MIB
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=f"more than the limit of {bound} bytes"):
            inflate(bomb, max_bytes=bound)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Output lands in one buffer that grows in steps, so the bound holds within a factor of two (the
    # stream would have reached a gigabyte).
    assert peak < 2 * bound


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (deflated(b"x" * 10_000)[:10], "truncated"),
        (b"\xff" * 64, "corrupt"),
    ],
)
def test_broken_streams_are_the_clients_error(stream: bytes, message: str) -> None:
    with pytest.raises(UnreadableImageError, match=message):
        inflate(stream)


def test_bytes_after_the_stream_are_ignored_as_zlib_does() -> None:
    assert inflate(deflated(b"dataset") + b"\x00\x12\x34") == b"dataset"


def test_an_abandoned_request_stops_inflating() -> None:
    cancelled = Cancellation()
    cancelled.cancel()
    with pytest.raises(DecodingCancelledError):
        inflate(zeros_deflate_stream(b"", 64 * MIB), cancellation=cancelled)


@pytest.mark.parametrize("upload", [part10(synthetic_ct()), png_bytes()])
def test_an_abandoned_request_stops_decoding(upload: bytes) -> None:
    cancelled = Cancellation()
    cancelled.cancel()
    limits = ImageLimits(max_bytes=64 * MIB, max_pixels=4 * MIB)
    with pytest.raises(DecodingCancelledError):
        decode_image(upload, limits, cancellation=cancelled)
    assert decode_image(upload, limits, cancellation=Cancellation()).width > 0
