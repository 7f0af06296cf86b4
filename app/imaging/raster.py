"""Ordinary image files (PNG, JPEG, TIFF, BMP, WebP) to an 8-bit RGB picture the model can see."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app.imaging.bounds import Cancellation
from app.imaging.errors import (
    TooManyPixelsError,
    UnreadableImageError,
    UnsupportedImageError,
)
from app.imaging.fence import reading_client_bytes

# MPO is the multi-picture JPEG that phones and some cameras write; its first picture is a plain JPEG.
ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP"})

# This module checks the decoded size against its own, configurable limit before any pixel is decoded.
# Pillow's process-wide check would otherwise warn, or raise, at a fixed size of its own choosing.
Image.MAX_IMAGE_PIXELS = None

NOT_AN_IMAGE = "the upload is not a readable image (accepted: PNG, JPEG, TIFF, BMP, WebP or DICOM)"

_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def decode_raster(data: bytes, *, max_pixels: int, cancellation: Cancellation) -> tuple[Image.Image, str]:
    """Decode an image file into RGB. Returns the picture and the file's format name.

    The header is read first; pixels are decoded only once their count is known to be within the limit,
    so Pillow's decoders write into a picture of that size and no more.
    """
    with reading_client_bytes("the image header is corrupt"):
        try:
            picture = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            raise UnreadableImageError(NOT_AN_IMAGE) from exc

    file_format = picture.format or "unknown"
    if file_format not in ACCEPTED_FORMATS:
        raise UnsupportedImageError(
            f"{file_format} images are not accepted (accepted: PNG, JPEG, TIFF, BMP, WebP or DICOM)"
        )
    width, height = picture.size
    if width * height > max_pixels:
        raise TooManyPixelsError(
            f"the image is {width}x{height} pixels, more than the limit of {max_pixels} pixels",
            width * height,
        )
    cancellation.check()
    with reading_client_bytes(f"the {file_format} image data is corrupt or truncated"):
        picture.load()
        # Phones and some scanners store the picture sideways with an EXIF note saying how to turn it.
        oriented = ImageOps.exif_transpose(picture)
        return to_rgb(oriented), "JPEG" if file_format == "MPO" else file_format


def to_rgb(picture: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer would display it."""
    mode = picture.mode
    if mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(stretch_to_uint8(np.asarray(picture)), mode="L").convert("RGB")
    if mode in ("P", "PA"):
        picture = picture.convert("RGBA" if "transparency" in picture.info or mode == "PA" else "RGB")
        mode = picture.mode
    if mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent areas become black: the background of a radiograph. White would read as dense tissue.
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return picture.convert("RGB")


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the values actually present onto 0..255.

    A 12-bit radiograph stored in 16-bit words uses 0..4095; dividing by 256 would leave it nearly black.
    Stretching its real range keeps all of its contrast. One working copy, transformed in place.
    """
    scaled = values.astype(np.float64)
    finite = np.isfinite(scaled)
    if not finite.any():
        return np.zeros(scaled.shape, dtype=np.uint8)
    low = float(scaled[finite].min())
    high = float(scaled[finite].max())
    if high <= low:
        return np.zeros(scaled.shape, dtype=np.uint8)
    scaled[~finite] = low
    scaled -= low
    scaled *= 255.0 / (high - low)
    np.rint(scaled, out=scaled)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)
