"""The fence around client bytes: what a parser raises while reading an upload is the client's error.

pydicom, Pillow and the codec plugins raise whatever their code meets on malformed input (struct.error,
OSError, NotImplementedError, KeyError, their own exception types...), and new versions add more. Listing
them would always be one short, and each gap is a 500 for a client's mistake. So, around every call that
reads client bytes, any exception raised inside the library becomes the ImageError that says what was
being read.

Bugs of our own must not hide behind the fence: an exception raised by code in this package (a frame
under `app`) passes through unchanged and still surfaces as a 500, in tests and in production. A library
deciding to fail is the library's frame; our code handing it nonsense shows up as our frame, or as a
TypeError in the library that the tests catch as a 400 where a 200 was due.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from app.imaging.errors import DecodingCancelledError, ImageError, UnreadableImageError

_OUR_PACKAGE = __name__.split(".")[0]


@contextmanager
def reading_client_bytes(message: str, error: type[ImageError] = UnreadableImageError) -> Iterator[None]:
    """Turn what a library raises while reading an upload into `error(message)`."""
    try:
        yield
    except (ImageError, DecodingCancelledError):
        raise
    except MemoryError:
        raise  # every decode is bounded before it runs: running out of memory is our failure, not theirs
    except Exception as exc:
        if raised_by_this_service(exc):
            raise
        raise error(message) from exc


def raised_by_this_service(exc: BaseException) -> bool:
    """Whether the innermost Python frame of the exception's traceback is code of this package."""
    innermost = _innermost(exc.__traceback__)
    if innermost is None:
        return False
    module = innermost.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and (module == _OUR_PACKAGE or module.startswith(f"{_OUR_PACKAGE}."))


def _innermost(traceback: TracebackType | None) -> TracebackType | None:
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback
