"""Uploaded bytes to a picture the model can see, with the facts about it that responses report."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from app.imaging.errors import (
    ImageError,
    ImageTooLargeError,
    UnreadableImageError,
    UnsupportedImageError,
    UnusableImageError,
)
from app.imaging.raster import decode_raster

__all__ = [
    "DecodedImage",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "UnusableImageError",
    "decode_image",
]

# Qwen3-VL sees 32x32-pixel tiles; a side shorter than one tile carries nothing the model can read.
MIN_SIDE = 32
# Qwen3-VL's resizing refuses aspect ratios beyond 200 (qwen-vl-utils' MAX_RATIO).
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class DecodedImage:
    picture: Image.Image  # 8-bit RGB, oriented as displayed
    source_format: str  # PNG, JPEG, ... as detected from the bytes, never from a file name

    @property
    def width(self) -> int:
        return self.picture.width

    @property
    def height(self) -> int:
        return self.picture.height


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode an upload, whatever its format, or raise an ImageError saying what is wrong with it."""
    if not data:
        raise UnreadableImageError("the image is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    picture, source_format = decode_raster(data, max_pixels=limits.max_pixels)
    check_usable(picture.width, picture.height)
    return DecodedImage(picture=picture, source_format=source_format)


def check_usable(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise UnusableImageError(
            f"the image is {width}x{height} pixels; both sides must be at least {MIN_SIDE} pixels"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise UnusableImageError(
            f"the image is {width}x{height} pixels; its aspect ratio must not exceed {MAX_ASPECT_RATIO}:1"
        )
