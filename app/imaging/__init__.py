"""Uploaded bytes to a picture the model can see, with the facts about it that responses report."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from pydicom.dataset import Dataset

from app.imaging.dicom import DicomSource, Window, decode_dicom, is_dicom, read_dataset
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
    "DicomSource",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "UnreadableImageError",
    "UnsupportedImageError",
    "UnusableImageError",
    "Window",
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
    max_frames: int = 10_000


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
    data: bytes, limits: ImageLimits, *, frame: int | None = None, window: str | None = None
) -> DecodedImage:
    """Decode an upload, whatever its format, or raise an ImageError saying what is wrong with it.

    The format is recognised from the bytes: DICOM by its 'DICM' marker (or, failing every image
    format, by parsing as a dataset without preamble), images by their signatures. `frame` and `window`
    apply to DICOM only.
    """
    if not data:
        raise UnreadableImageError("the image is empty")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes, more than the limit of {limits.max_bytes}")
    if is_dicom(data):
        return _decode_dicom(read_dataset(data, require_preamble=True), limits, frame, window)
    try:
        picture, source_format = decode_raster(data, max_pixels=limits.max_pixels)
    except UnreadableImageError:
        try:
            dataset = read_dataset(data, require_preamble=False)
        except UnreadableImageError:
            raise UnreadableImageError(
                "the upload is not a readable image (accepted: PNG, JPEG, TIFF, BMP, WebP or DICOM)"
            ) from None
        return _decode_dicom(dataset, limits, frame, window)
    if frame is not None or window is not None:
        raise UnusableImageError("frame and window apply to DICOM images only")
    check_usable(picture.width, picture.height)
    return DecodedImage(picture=picture, source_format=source_format)


def _decode_dicom(
    dataset: Dataset, limits: ImageLimits, frame: int | None, window: str | None
) -> DecodedImage:
    picture, source = decode_dicom(
        dataset, max_pixels=limits.max_pixels, max_frames=limits.max_frames, frame=frame, window=window
    )
    check_usable(picture.width, picture.height)
    return DecodedImage(picture=picture, source_format="DICOM", dicom=source)


def check_usable(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise UnusableImageError(
            f"the image is {width}x{height} pixels; both sides must be at least {MIN_SIDE} pixels"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise UnusableImageError(
            f"the image is {width}x{height} pixels; its aspect ratio must not exceed {MAX_ASPECT_RATIO}:1"
        )
