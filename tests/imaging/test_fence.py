"""The fence: what a library raises on client bytes becomes the client's error; our own bugs stay ours."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image

from app.imaging import UnreadableImageError, UnsupportedImageError
from app.imaging.dicom import apply_window
from app.imaging.fence import raised_by_this_service, reading_client_bytes


def test_what_a_library_raises_on_client_bytes_becomes_the_named_error() -> None:
    with (
        pytest.raises(UnreadableImageError, match="header is corrupt") as raised,
        reading_client_bytes("the header is corrupt"),
    ):
        pydicom.dcmread(io.BytesIO(b"\x08\x00\x16\x00XX\x00\x00\xfc\xe0\x7f\x10\x00"), force=True).SOPClassUID  # noqa: B018
    assert isinstance(
        raised.value.__cause__, NotImplementedError
    )  # pydicom's own complaint, kept as the cause


def test_the_error_class_can_be_chosen() -> None:
    with pytest.raises(UnsupportedImageError), reading_client_bytes("not here", UnsupportedImageError):
        Image.open(io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)).load()


def test_a_bug_in_our_own_code_passes_through_unchanged() -> None:
    # apply_window is ours: handed nonsense, it fails in our frame, and that must stay a 500.
    with pytest.raises(AttributeError), reading_client_bytes("never shown"):
        apply_window(None, 40.0, 400.0)  # type: ignore[arg-type]


def test_running_out_of_memory_is_not_blamed_on_the_client() -> None:
    def allocate() -> None:
        raise MemoryError

    with pytest.raises(MemoryError), reading_client_bytes("never shown"):
        allocate()


def test_the_origin_is_the_innermost_frame() -> None:
    with pytest.raises(Image.UnidentifiedImageError) as pillow:
        np.asarray(Image.open(io.BytesIO(b"not an image")))
    assert not raised_by_this_service(pillow.value)
    with pytest.raises(AttributeError) as ours:
        apply_window(None, 0.0, 1.0)  # type: ignore[arg-type]
    assert raised_by_this_service(ours.value)
