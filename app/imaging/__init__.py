"""Uploaded bytes to a picture the model can see, with the facts about it that responses report."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from app.imaging.bounds import Cancellation
from app.imaging.dicom import DicomSource, Window, decode_dicom
from app.imaging.dicom_file import is_part10, looks_like_headerless_dataset, read_dicom
from app.imaging.errors import (
    DecodingCancelledError,
    ImageError,
    ImageTooLargeError,
    TooManyPixelsError,
    UnreadableImageError,
    UnsupportedImageError,
    UnusableImageError,
)
from app.imaging.limits import ImageLimits, check_usable
from app.imaging.raster import decode_raster

__all__ = [
    "Cancellation",
    "DecodedImage",
    "DecodingCancelledError",
    "DicomSource",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "TooManyPixelsError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "UnusableImageError",
    "Window",
    "decode_image",
]


@dataclass(frozen=True)
class DecodedImage:
    picture: Image.Image  # 8-bit RGB, oriented as displayed
    source_format: str  # PNG, JPEG, DICOM, ... as detected from the bytes, never from a file name
    dicom: DicomSource | None = None

    @property
    def width(self) -> int:
        return self.picture.width

    @property
    def height(self) -> int:
        return self.picture.height


def decode_image(
    data: bytes,
    limits: ImageLimits,
    *,
    frame: int | None = None,
    window: str | None = None,
    cancellation: Cancellation | None = None,
) -> DecodedImage:
    """Decode an upload, whatever its format, or raise an ImageError saying what is wrong with it.

    The format is recognised from the bytes: DICOM by its 'DICM' marker or, without the Part 10 header,
    by the group its first element belongs to; images by their signatures. `frame` and `window` apply to
    DICOM only. When `cancellation` is set (the request was abandoned) decoding stops at its next step
    with DecodingCancelledError.
    """
    cancellation = cancellation or Cancellation()
    cancellation.check()  # abandoned while it waited for a preparation thread
    if not data:
        raise UnreadableImageError("the image is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    if is_part10(data) or looks_like_headerless_dataset(data):
        dataset = read_dicom(data, max_inflated_bytes=limits.max_bytes, cancellation=cancellation)
        picture, source = decode_dicom(
            dataset,
            max_pixels=limits.max_pixels,
            max_frames=limits.max_frames,
            frame=frame,
            window=window,
            cancellation=cancellation,
        )
        check_usable(picture.width, picture.height)
        return DecodedImage(picture=picture, source_format="DICOM", dicom=source)
    picture, source_format = decode_raster(data, max_pixels=limits.max_pixels, cancellation=cancellation)
    if frame is not None or window is not None:
        raise UnusableImageError("frame and window apply to DICOM images only")
    check_usable(picture.width, picture.height)
    return DecodedImage(picture=picture, source_format=source_format)
