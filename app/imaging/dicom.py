"""DICOM Part 10 to an 8-bit RGB picture, the way a radiology viewer displays it.

Stored values go through the Modality LUT (rescale slope and intercept: CT numbers become Hounsfield
units), then through a VOI transform: the window the client asked for (a preset or centre and width),
else the VOI LUT or first window stored in the file, else the full range of the values present.
MONOCHROME1 is inverted; palette colour and YBR become RGB. One frame of a multi-frame object is decoded,
the middle one unless the client names another.

pydicom (with the pylibjpeg and pyjpegls plugins for compressed transfer syntaxes) decodes and applies
the Modality LUT, VOI LUT tables and palettes. The window function itself is written out here: pydicom's
maps onto the stored bit depth's range, while a picture for the model needs exactly 0..255.

The dataset kept for the response and the Structured Report carries patient data: it is never logged,
and only its UIDs, modality, frame and window reach a JSON response.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.config
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from app.imaging.errors import (
    ImageTooLargeError,
    UnreadableImageError,
    UnsupportedImageError,
    UnusableImageError,
)
from app.imaging.raster import stretch_to_uint8

# Common CT windows (Hounsfield units): centre, width.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
WINDOW_PATTERN = r"^(lung|mediastinum|soft_tissue|bone|brain|-?\d+(\.\d+)?\s*,\s*\d+(\.\d+)?)$"

# Real-world files are full of small deviations from the standard (an IS of '1A', say) that pydicom copes
# with. Validating them only produces warnings, whose text quotes the offending values: patient data.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class Window:
    center: float | None  # None for a VOI LUT table, which has no centre or width
    width: float | None
    source: str  # "request", a preset's name, "file", "voi_lut" or "full_range"


@dataclass(frozen=True)
class DicomSource:
    """The source instance: its identity for responses, and its header for the Structured Report."""

    header: Dataset  # all attributes but the pixel data: patient data included, never log it
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    frame: int  # 1-based, as DICOM numbers frames
    frames: int
    window: Window | None


def is_dicom(data: bytes) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def read_dataset(data: bytes, *, require_preamble: bool) -> Dataset:
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=not require_preamble)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, OverflowError) as exc:
        raise UnreadableImageError("the DICOM file is corrupt or truncated") from exc
    if not require_preamble and "SOPClassUID" not in dataset and not _has_pixels(dataset):
        raise UnreadableImageError("the upload is neither an image nor a DICOM dataset")
    return dataset


def decode_dicom(
    dataset: Dataset, *, max_pixels: int, frame: int | None, window: str | None, max_frames: int = 10_000
) -> tuple[Image.Image, DicomSource]:
    if not _has_pixels(dataset):
        kind = _sop_class_name(dataset)
        raise UnusableImageError(f"this DICOM object ({kind}) holds no image")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        frames = int(dataset.get("NumberOfFrames") or 1)
        photometric = str(dataset.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError) as exc:
        raise UnreadableImageError(
            "the DICOM image attributes (rows, columns, frames) are missing or invalid"
        ) from exc
    if frames > max_frames:
        raise ImageTooLargeError(f"the object declares {frames} frames, more than the limit of {max_frames}")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            f"the image is {columns}x{rows} pixels, more than the limit of {max_pixels} pixels"
        )
    frame_number = frames // 2 + 1 if frame is None else frame
    if not 1 <= frame_number <= frames:
        raise UnusableImageError(f"frame {frame_number} does not exist; this object has frames 1 to {frames}")
    if window is not None and photometric not in _MONOCHROME:
        raise UnusableImageError(f"a window applies to grayscale images, not to {photometric}")

    stored = _decode_frame(dataset, frame_number - 1)
    if photometric in _MONOCHROME:
        gray, applied = _display_grayscale(stored, dataset, window)
        if photometric == "MONOCHROME1":  # 0 is white
            gray = 255 - gray
        picture = Image.fromarray(gray, mode="L").convert("RGB")
    elif photometric == "PALETTE COLOR":
        bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
        picture, applied = (
            Image.fromarray(_to_uint8(apply_color_lut(stored, dataset), bits), mode="RGB"),
            None,
        )
    elif stored.ndim == 3 and stored.shape[-1] == 3:  # RGB, and YBR already converted by pydicom
        bits = int(dataset.get("BitsStored") or dataset.get("BitsAllocated") or 8)
        picture, applied = Image.fromarray(_to_uint8(stored, bits), mode="RGB"), None
    else:
        raise UnsupportedImageError(f"photometric interpretation {photometric} is not supported")

    for keyword in _PIXEL_DATA_KEYWORDS:  # the header is kept for the report; the pixels are not needed
        if keyword in dataset:
            delattr(dataset, keyword)
    source = DicomSource(
        header=dataset,
        study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
        series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        sop_class_uid=str(dataset.get("SOPClassUID", "")),
        modality=str(dataset.Modality) if dataset.get("Modality") else None,
        frame=frame_number,
        frames=frames,
        window=applied,
    )
    return picture, source


def parse_window(value: str) -> tuple[float, float, str]:
    """A preset's name or 'center,width' as (center, width, where it came from)."""
    preset = WINDOW_PRESETS.get(value)
    if preset is not None:
        return preset[0], preset[1], value
    if not re.fullmatch(WINDOW_PATTERN, value):
        raise UnusableImageError(f"window must be one of {', '.join(WINDOW_PRESETS)} or 'center,width'")
    center, width = (float(part) for part in value.split(","))
    if width < 1:
        raise UnusableImageError("a window's width must be at least 1")
    return center, width, "request"


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of DICOM PS3.3 C.11.2.1.2 onto 0..255."""
    values = values.astype(np.float64)
    if function == "SIGMOID":
        scaled = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        scaled = (values - center) / width + 0.5
    else:  # LINEAR, the default
        if width <= 1:
            scaled = (values > center - 0.5).astype(np.float64)
        else:
            scaled = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(np.rint(np.clip(scaled, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def _display_grayscale(
    stored: np.ndarray, dataset: Dataset, requested: str | None
) -> tuple[np.ndarray, Window]:
    if stored.ndim != 2:
        raise UnusableImageError("a grayscale DICOM frame must have one sample per pixel")
    values = apply_modality_lut(stored, dataset)
    if requested is not None:
        center, width, source = parse_window(requested)
        return apply_window(values, center, width), Window(center=center, width=width, source=source)
    if "VOILUTSequence" in dataset:
        try:
            lut_output = apply_voi_lut(values.astype(np.int64), dataset, index=0, prefer_lut=True)
            bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
            return _to_uint8(lut_output, bits), Window(center=None, width=None, source="voi_lut")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            pass  # a malformed table: fall back to the stored window or the full range
    stored_window = _first_stored_window(dataset)
    if stored_window is not None:
        center, width = stored_window
        function = str(dataset.get("VOILUTFunction", "LINEAR")).strip().upper()
        return apply_window(values, center, width, function), Window(
            center=center, width=width, source="file"
        )
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    return stretch_to_uint8(values), Window(center=(low + high) / 2, width=high - low, source="full_range")


def _first_stored_window(dataset: Dataset) -> tuple[float, float] | None:
    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        first_center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        first_width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (first_center, first_width) if first_width > 0 else None


def _decode_frame(dataset: Dataset, index: int) -> np.ndarray:
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    try:
        return pixel_array(dataset, index=index)
    except (NotImplementedError, RuntimeError) as exc:
        if transfer_syntax is not None and getattr(transfer_syntax, "is_compressed", False):
            name = getattr(transfer_syntax, "name", str(transfer_syntax))
            raise UnsupportedImageError(f"pixel data in {name} cannot be decoded here") from exc
        raise UnreadableImageError("the DICOM pixel data cannot be decoded") from exc
    except (ValueError, AttributeError, KeyError, TypeError, IndexError, EOFError, OSError) as exc:
        raise UnreadableImageError("the DICOM pixel data is corrupt or inconsistent with its header") from exc


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype == np.uint8 and bits <= 8:
        return values
    top = float(2 ** max(1, min(bits, 32)) - 1)
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _has_pixels(dataset: Dataset) -> bool:
    return any(keyword in dataset for keyword in _PIXEL_DATA_KEYWORDS)


def _sop_class_name(dataset: Dataset) -> str:
    uid = dataset.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown SOP class")
