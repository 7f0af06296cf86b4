"""A DICOM dataset to an 8-bit RGB picture, the way a radiology viewer displays it.

Stored values go through the Modality LUT (rescale slope and intercept: CT numbers become Hounsfield
units), then through a VOI transform: the window the client asked for (a preset or centre and width),
else the VOI LUT or first window stored in the file, else the full range of the values present.
MONOCHROME1 is inverted; palette colour and YBR become RGB. One frame of a multi-frame object is decoded,
the middle one unless the client names another.

Reading the bytes is dicom_file's work, and decoding a frame within the limits dicom_pixels'. pydicom
(with the pylibjpeg and pyjpegls plugins for compressed transfer syntaxes) decodes and applies the
Modality LUT, VOI LUT tables and palettes, each inside the fence that makes its failures the client's. The window function itself is written out here: pydicom's
maps onto the stored bit depth's range, while a picture for the model needs exactly 0..255.

The dataset kept for the response and the Structured Report carries patient data: it is never logged,
and only its UIDs, modality, frame and window reach a JSON response.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from app.imaging.bounds import Cancellation
from app.imaging.dicom_file import PIXEL_DATA_KEYWORDS, has_pixel_data
from app.imaging.dicom_palette import palette_to_rgb
from app.imaging.dicom_pixels import decode_frame, read_layout
from app.imaging.errors import UnreadableImageError, UnsupportedImageError, UnusableImageError
from app.imaging.fence import reading_client_bytes
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

_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})


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


def decode_dicom(
    dataset: Dataset,
    *,
    max_pixels: int,
    frame: int | None,
    window: str | None,
    max_frames: int = 10_000,
    cancellation: Cancellation | None = None,
) -> tuple[Image.Image, DicomSource]:
    cancellation = cancellation or Cancellation()
    if not has_pixel_data(dataset):
        kind = _sop_class_name(dataset)
        if kind is None:
            raise UnusableImageError(
                "this DICOM object has no pixel data and no SOP class this service recognises: it holds no "
                "image, or it is truncated"
            )
        raise UnusableImageError(f"this DICOM object ({kind}) holds no image")
    layout = read_layout(dataset, max_pixels=max_pixels, max_frames=max_frames)
    photometric = _photometric_interpretation(dataset)
    frame_number = layout.frames // 2 + 1 if frame is None else frame
    if not 1 <= frame_number <= layout.frames:
        raise UnusableImageError(
            f"frame {frame_number} does not exist; this object has frames 1 to {layout.frames}"
        )
    if window is not None and photometric not in _MONOCHROME:
        raise UnusableImageError(f"a window applies to grayscale images, not to {photometric}")

    stored = decode_frame(dataset, frame_number - 1, layout, cancellation)
    cancellation.check()
    applied: Window | None = None
    if photometric in _MONOCHROME:
        gray, applied = _display_grayscale(stored, dataset, window)
        if photometric == "MONOCHROME1":  # 0 is white
            gray = 255 - gray
        picture = Image.fromarray(gray, mode="L").convert("RGB")
    elif photometric == "PALETTE COLOR":
        picture = Image.fromarray(palette_to_rgb(stored, dataset), mode="RGB")
    elif stored.ndim == 3 and stored.shape[-1] == 3:  # RGB, and YBR already converted by pydicom
        bits = _bits_stored(dataset, layout.bits_allocated)
        picture = Image.fromarray(_to_uint8(stored, bits), mode="RGB")
    else:
        raise UnsupportedImageError(f"photometric interpretation {photometric} is not supported")

    # The header is kept until the response is sent, for the report; the pixels are not needed, nor the
    # buffer the dataset was read from (for a deflated upload, everything it inflated to).
    for keyword in PIXEL_DATA_KEYWORDS:
        if keyword in dataset:
            delattr(dataset, keyword)
    if isinstance(dataset, FileDataset):
        dataset.buffer = None
    source = DicomSource(
        header=dataset,
        study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
        series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        sop_class_uid=str(dataset.get("SOPClassUID", "")),
        modality=str(dataset.Modality) if dataset.get("Modality") else None,
        frame=frame_number,
        frames=layout.frames,
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
    """The VOI window of DICOM PS3.3 C.11.2.1.2 onto 0..255.

    One working copy, transformed in place: a frame at the pixel limit costs 8 bytes a pixel here, not
    the four temporaries that the same formula written as expressions would allocate.
    """
    scaled = values.astype(np.float64)  # always a copy: the caller's values are left as they are
    if function == "SIGMOID":
        scaled -= center
        scaled *= -4.0 / width
        np.exp(scaled, out=scaled)
        scaled += 1.0
        np.reciprocal(scaled, out=scaled)
    elif function == "LINEAR_EXACT":
        scaled -= center
        scaled /= width
        scaled += 0.5
    elif width <= 1:  # LINEAR with a width of 1: a threshold
        np.greater(scaled, center - 0.5, out=scaled)
    else:  # LINEAR, the default
        scaled -= center - 0.5
        scaled /= width - 1
        scaled += 0.5
    np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled *= 255.0
    np.rint(scaled, out=scaled)
    return scaled.astype(np.uint8)


def _display_grayscale(
    stored: np.ndarray, dataset: Dataset, requested: str | None
) -> tuple[np.ndarray, Window]:
    if stored.ndim != 2:
        raise UnusableImageError("a grayscale DICOM frame must have one sample per pixel")
    with reading_client_bytes("the DICOM Modality LUT or rescale values are invalid"):
        values = apply_modality_lut(stored, dataset)
    if requested is not None:
        center, width, source = parse_window(requested)
        return apply_window(values, center, width), Window(center=center, width=width, source=source)
    if "VOILUTSequence" in dataset and dataset.VOILUTSequence:
        return _through_voi_lut(values, dataset), Window(center=None, width=None, source="voi_lut")
    stored_window = _first_stored_window(dataset)
    if stored_window is not None:
        center, width = stored_window
        function = str(dataset.get("VOILUTFunction", "LINEAR")).strip().upper()
        return apply_window(values, center, width, function), Window(
            center=center, width=width, source="file"
        )
    low, high = _finite_range(values)
    return stretch_to_uint8(values), Window(center=(low + high) / 2, width=high - low, source="full_range")


def _through_voi_lut(values: np.ndarray, dataset: Dataset) -> np.ndarray:
    """The first VOI LUT table applied. A malformed table is refused rather than replaced by another
    window: the file says this is how its values are to be seen. A requested window overrides it."""
    refusal = (
        "the file's VOI LUT is invalid; send a window (a preset or 'center,width') to display the image "
        "without it"
    )
    item = dataset.VOILUTSequence[0] if dataset.VOILUTSequence else None
    descriptor = item.get("LUTDescriptor") if item is not None else None
    bits = descriptor[2] if isinstance(descriptor, Sequence) and len(descriptor) == 3 else None
    # PS3.3 C.11.2.1.1 asks for 8 to 16 bits per entry; a few writers store fewer, which still map.
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise UnreadableImageError(refusal)
    with reading_client_bytes(refusal):
        return _to_uint8(apply_voi_lut(values.astype(np.int64), dataset, index=0, prefer_lut=True), bits)


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


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


def _photometric_interpretation(dataset: Dataset) -> str:
    value = dataset.get("PhotometricInterpretation")
    if not isinstance(value, str) or not value.strip():
        raise UnreadableImageError("the DICOM header's Photometric Interpretation is missing or malformed")
    return value.strip().upper()


def _bits_stored(dataset: Dataset, bits_allocated: int) -> int:
    value = dataset.get("BitsStored")
    return value if isinstance(value, int) and 1 <= value <= bits_allocated else bits_allocated


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype == np.uint8 and bits <= 8:
        return values
    top = float(2 ** max(1, min(bits, 32)) - 1)
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _sop_class_name(dataset: Dataset) -> str | None:
    # Registered names only: an unregistered UID is the client's own string, and messages never echo input.
    uid = dataset.get("SOPClassUID") or dataset.file_meta.get("MediaStorageSOPClassUID")
    name = getattr(uid, "name", None)
    return str(name) if isinstance(uid, UID) and name and name != str(uid) else None
