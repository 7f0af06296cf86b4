"""The limits an upload is held to, and the shapes of image the model can use."""

from __future__ import annotations

from dataclasses import dataclass

from app.imaging.errors import UnusableImageError

# Qwen3-VL sees 32x32-pixel tiles; a side shorter than one tile carries nothing the model can read.
MIN_SIDE = 32
# Qwen3-VL's resizing refuses aspect ratios beyond 200 (qwen-vl-utils' MAX_RATIO).
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # the upload, and anything inflated from it
    max_pixels: int  # one decoded picture or frame
    max_frames: int = 10_000


def check_usable(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise UnusableImageError(
            f"the image is {width}x{height} pixels; both sides must be at least {MIN_SIDE} pixels"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise UnusableImageError(
            f"the image is {width}x{height} pixels; its aspect ratio must not exceed {MAX_ASPECT_RATIO}:1"
        )
