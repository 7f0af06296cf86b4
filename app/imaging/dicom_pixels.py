"""One frame of DICOM pixel data to an array, decoded only once its size is known to fit the limits.

Before any decoder allocates memory:

- the transfer syntax is one that an installed decoder handles (otherwise 415);
- rows x columns is within the pixel limit, with 1 or 3 samples of a size decoders produce, and the
  decoded frame within DECODED_BYTES_PER_PIXEL bytes per allowed pixel (413);
- uncompressed pixel data holds at least the rows x columns x frames x samples x bits its header
  declares (400: pydicom would otherwise read past a short buffer's end);
- a compressed frame's own header (JPEG, JPEG-LS, JPEG 2000) declares the same size as the dataset:
  a codec allocates what its codestream says, whatever the dataset says, so a 400-byte JPEG 2000 frame
  in a 64x64 dataset could otherwise make the decoder fill 8000x8000 pixels. RLE needs no such check:
  its decoder writes into an array sized from the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from openjpeg.utils import get_parameters as jpeg_2000_parameters
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import _get_jpg_parameters, get_expected_length, pixel_array
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from app.imaging.bounds import Cancellation
from app.imaging.dicom_file import PIXEL_DATA_KEYWORDS
from app.imaging.errors import (
    ImageTooLargeError,
    TooManyPixelsError,
    UnreadableImageError,
    UnsupportedImageError,
)
from app.imaging.fence import reading_client_bytes

# The largest ordinary sample layout, 16-bit RGB: a frame may decode to this many bytes per pixel of the
# pixel limit. Wider samples (32- or 64-bit) are accepted on correspondingly fewer pixels.
DECODED_BYTES_PER_PIXEL = 6
_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
_JPEG_FAMILY = frozenset({*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes})
_JPEG_2000_FAMILY = frozenset(JPEG2000TransferSyntaxes)


@dataclass(frozen=True)
class PixelLayout:
    """What the dataset declares about its pixels, each value checked to be a positive integer."""

    rows: int
    columns: int
    frames: int
    samples: int
    bits_allocated: int

    @property
    def frame_bytes(self) -> int:
        return self.rows * self.columns * self.samples * max(1, self.bits_allocated // 8)


def read_layout(dataset: Dataset, *, max_pixels: int, max_frames: int) -> PixelLayout:
    """The declared pixel layout, refused when it is malformed or larger than the limits allow."""
    layout = PixelLayout(
        rows=_positive_integer(dataset, "Rows"),
        columns=_positive_integer(dataset, "Columns"),
        frames=_positive_integer(dataset, "NumberOfFrames", default=1),
        samples=_positive_integer(dataset, "SamplesPerPixel", default=1),
        bits_allocated=_positive_integer(dataset, "BitsAllocated"),
    )
    if layout.frames > max_frames:
        raise ImageTooLargeError(
            f"the object declares {layout.frames} frames, more than the limit of {max_frames}"
        )
    if layout.rows * layout.columns > max_pixels:
        raise TooManyPixelsError(
            f"the image is {layout.columns}x{layout.rows} pixels, more than the limit of {max_pixels} pixels",
            layout.columns * layout.rows,
        )
    if layout.samples not in (1, 3):
        raise UnsupportedImageError(f"images with {layout.samples} samples per pixel are not supported")
    if layout.bits_allocated not in _BITS_ALLOCATED:
        raise UnreadableImageError(
            f"the DICOM header declares {layout.bits_allocated} bits allocated per sample"
        )
    if layout.frame_bytes > DECODED_BYTES_PER_PIXEL * max_pixels:
        raise ImageTooLargeError(
            f"a frame of {layout.columns}x{layout.rows} pixels with {layout.samples} samples of "
            f"{layout.bits_allocated} bits decodes to more than {DECODED_BYTES_PER_PIXEL * max_pixels} bytes"
        )
    return layout


def decode_frame(dataset: Dataset, index: int, layout: PixelLayout, cancellation: Cancellation) -> np.ndarray:
    """Frame `index` (0-based) as pydicom decodes it, once the checks above have passed."""
    syntax = UID(str(dataset.file_meta.TransferSyntaxUID))
    with reading_client_bytes(
        f"pixel data in {_syntax_name(syntax)} cannot be decoded here", UnsupportedImageError
    ):
        if not get_decoder(syntax).is_available:
            raise UnsupportedImageError(f"no decoder for {_syntax_name(syntax)} is installed")
    if syntax.is_encapsulated:
        _check_compressed_frame(dataset, syntax, index, layout)
    else:
        _check_uncompressed_length(dataset, layout)
    cancellation.check()
    failed = (
        _undecodable(syntax)
        if syntax.is_encapsulated
        else "the DICOM pixel data is inconsistent with its header"
    )
    with reading_client_bytes(failed):
        return pixel_array(dataset, index=index)


def _check_uncompressed_length(dataset: Dataset, layout: PixelLayout) -> None:
    with reading_client_bytes("the DICOM image attributes are inconsistent"):
        expected = get_expected_length(dataset, "bytes")
        present = len(dataset[_pixel_keyword(dataset)].value or b"")
    if present < expected:
        raise UnreadableImageError(
            f"the pixel data holds {present} bytes, fewer than the {expected} its header declares "
            f"({layout.columns}x{layout.rows} pixels, {layout.frames} frames, {layout.samples} samples "
            f"of {layout.bits_allocated} bits)"
        )


def _check_compressed_frame(dataset: Dataset, syntax: UID, index: int, layout: PixelLayout) -> None:
    with reading_client_bytes("the DICOM compressed pixel data is corrupt: its frames cannot be found"):
        offsets = None
        if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
            offsets = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
        codestream = get_frame(
            dataset.PixelData, index, number_of_frames=layout.frames, extended_offsets=offsets
        )
    if syntax in _JPEG_FAMILY:
        # pydicom's own reader of a JPEG or JPEG-LS frame header, the one its decoders consult: private,
        # but pinned (docker/constraints.txt), and it reads only the header. libjpeg's get_parameters
        # cannot serve: it allocates the whole frame the header declares, the very thing checked here.
        with reading_client_bytes(_undecodable(syntax)):
            jpeg = _get_jpg_parameters(codestream)
        if not {"width", "height", "components"} <= jpeg.keys():  # it answers {} for what it cannot parse
            raise UnreadableImageError(_undecodable(syntax))
        size = (int(jpeg["width"]), int(jpeg["height"]), int(jpeg["components"]))
    elif syntax in _JPEG_2000_FAMILY:
        with reading_client_bytes(_undecodable(syntax)):
            j2k = jpeg_2000_parameters(codestream)
            size = (int(j2k["columns"]), int(j2k["rows"]), int(j2k["samples_per_pixel"]))
    else:
        return
    declared = (layout.columns, layout.rows, layout.samples)
    if size != declared:
        raise UnreadableImageError(
            f"the compressed frame is {size[0]}x{size[1]} pixels with {size[2]} samples, but the DICOM "
            f"header declares {declared[0]}x{declared[1]} with {declared[2]}"
        )


def _undecodable(syntax: UID) -> str:
    # A decoder's failure cannot tell damage from a variant it does not implement (a 12-bit lossy JPEG
    # only GDCM reads, say); either way these bytes will not decode here, and sending them again will not help.
    return (
        f"the {_syntax_name(syntax)} pixel data cannot be decoded: it is corrupt, "
        "or uses a variant the installed decoders do not implement"
    )


def _syntax_name(syntax: UID) -> str:
    # Only registered names: a private UID is the client's own string, and messages never echo input.
    with reading_client_bytes("the transfer syntax UID is malformed"):
        return str(syntax.name) if syntax.is_transfer_syntax else "an unrecognised transfer syntax"


def _pixel_keyword(dataset: Dataset) -> str:
    return next(keyword for keyword in PIXEL_DATA_KEYWORDS if keyword in dataset)


def _positive_integer(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    value = dataset.get(keyword)
    # Writers leave Number of Frames empty or 0 on single-frame objects.
    if value is None or value == "" or (value == 0 and default is not None):
        if default is not None:
            return default
        raise UnreadableImageError(f"the DICOM header has no {keyword} value")
    # US elements read as int, IS as an int subclass; anything else (a list from a multi-valued element,
    # text pydicom kept because it was not a number) is malformed.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return int(value)
    raise UnreadableImageError(f"the DICOM header's {keyword} value is malformed or not positive")
