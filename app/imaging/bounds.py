"""Bounds on decoding work: a cancellation flag checked between steps, and inflation that stops at a limit.

Decoding runs in a worker thread that nobody can interrupt. When its request is abandoned (the client
went away, the deadline passed) the request's task sets the flag, and the decoder stops at the next
check instead of finishing work nobody will read.
"""

from __future__ import annotations

import io
import threading
import zlib

from app.imaging.errors import DecodingCancelledError, ImageTooLargeError, UnreadableImageError

# Inflated output is produced this much at a time: small enough that the cancellation flag is seen
# within milliseconds, large enough that the loop costs nothing next to zlib itself.
INFLATE_STEP_BYTES = 1024 * 1024


class Cancellation:
    """Set once by the request's side; checked by the decoding thread between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise DecodingCancelledError("the request was abandoned while its upload was being decoded")


def inflate_raw(
    deflated: bytes | memoryview, *, max_bytes: int, cancellation: Cancellation, what: str
) -> io.BytesIO:
    """Inflate a raw deflate stream (RFC 1951, no zlib header), refusing output beyond `max_bytes`.

    zlib.decompress would allocate whatever the stream expands to (a 1 MB stream of zeros becomes 1 GB)
    before anyone could look at it. decompressobj with max_length produces a bounded step at a time, so
    the refusal comes after at most `max_bytes` of output, and a truncated or corrupt stream is reported
    as that. Bytes after the end of the stream are ignored, as zlib and pydicom do: some writers put a
    gzip-style checksum and length there (pydicom's own image_dfl.dcm has one). The output is written straight into the stream returned, so it is held once, not twice.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = io.BytesIO()
    produced = 0
    pending = deflated
    try:
        while not inflater.eof:
            cancellation.check()
            step = min(INFLATE_STEP_BYTES, max_bytes - produced + 1)
            piece = inflater.decompress(pending, step)
            pending = inflater.unconsumed_tail
            produced += len(piece)
            if produced > max_bytes:
                raise ImageTooLargeError(f"{what} inflates to more than the limit of {max_bytes} bytes")
            inflated.write(piece)
            if not piece and not pending:  # all input consumed, no output left, and no end of stream
                raise UnreadableImageError(f"{what} is truncated: its deflate stream ends early")
    except zlib.error as exc:
        raise UnreadableImageError(f"{what} is corrupt: its deflate stream cannot be inflated") from exc
    inflated.seek(0)
    return inflated
