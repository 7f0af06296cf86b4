"""DICOM bytes to a pydicom dataset: nothing inflated past the limits, every element read inside the fence.

Two layouts are recognised by their content:

- Part 10 files: a 128-byte preamble, 'DICM', the File Meta Information (group 0002), the dataset.
- Datasets without that header, as some archives export them: they begin with their File Meta elements
  (group 0002) or, with no File Meta at all, with the Identifying elements (group 0008) that every image
  dataset starts with (SOP Class UID is one of them). Without File Meta there is no transfer syntax to
  read, so the encoding pydicom detects (implicit or explicit VR, little or big endian) is taken as an
  uncompressed one; compressed pixel data needs File Meta to say how it was compressed.

pydicom inflates the Deflated Explicit VR Little Endian syntax whole, in one zlib call, before any limit
could apply. Here the File Meta is read first; a deflated dataset is inflated with a bound (at most the
upload limit: the same dataset sent uncompressed could not have been larger) and pydicom is handed the
inflated bytes.
"""

from __future__ import annotations

import io

import pydicom.config
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.filereader import dcmread, read_dataset, read_preamble
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from app.imaging.bounds import Cancellation, inflate_raw
from app.imaging.errors import UnreadableImageError
from app.imaging.fence import reading_client_bytes

# The first two bytes of a dataset without a Part 10 header: group 0002 or 0008 little endian, or
# group 0008 big endian (File Meta is always little endian).
_HEADERLESS_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x08")
_FILE_META_GROUP = 0x0002

# Real-world files are full of small deviations from the standard (an IS of '1A', say) that pydicom copes
# with. Validating them only produces warnings, whose text quotes the offending values: patient data.
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def is_part10(data: bytes) -> bool:
    """Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def looks_like_headerless_dataset(data: bytes) -> bool:
    # 8 bytes: the smallest element header (tag, VR or length).
    return len(data) >= 8 and data[:2] in _HEADERLESS_STARTS


def read_dicom(data: bytes, *, max_inflated_bytes: int, cancellation: Cancellation) -> Dataset:
    """Parse a Part 10 file or a headerless dataset, with every element's value decoded."""
    with reading_client_bytes("the DICOM file meta information is corrupt or truncated"):
        stream = io.BytesIO(data)
        preamble = read_preamble(stream, True)  # None, and back at the start, when there is no preamble
        file_meta = FileMetaDataset(
            read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta)
        )
        deflated = file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        dataset_start = stream.tell()
    if deflated:
        dataset = _read_deflated(data, dataset_start, preamble, file_meta, max_inflated_bytes, cancellation)
    else:
        with reading_client_bytes("the DICOM dataset is corrupt or truncated"):
            dataset = dcmread(io.BytesIO(data), force=True)
    cancellation.check()
    with reading_client_bytes("the DICOM dataset holds an element whose value is corrupt"):
        # pydicom decodes values when they are first touched; touching them all here keeps a malformed
        # value from failing later, in code that is not reading the upload (the Structured Report, say).
        for _ in dataset.iterall():
            pass
        if "TransferSyntaxUID" not in dataset.file_meta:
            dataset.file_meta.TransferSyntaxUID = _uncompressed_syntax(dataset)
    if preamble is None and not _valid_uid(dataset.get("SOPClassUID")) and not has_pixel_data(dataset):
        # Without 'DICM' the bytes were only taken for a dataset by their first two: say so.
        raise UnreadableImageError(
            "the upload is neither an image nor a DICOM dataset (it has no Part 10 header, "
            "no valid SOP Class UID and no pixel data)"
        )
    return dataset


def _valid_uid(value: object) -> bool:
    return isinstance(value, UID) and value.is_valid


def has_pixel_data(dataset: Dataset) -> bool:
    return any(keyword in dataset for keyword in PIXEL_DATA_KEYWORDS)


PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read_deflated(
    data: bytes,
    dataset_start: int,
    preamble: bytes | None,
    file_meta: FileMetaDataset,
    max_inflated_bytes: int,
    cancellation: Cancellation,
) -> Dataset:
    inflated = inflate_raw(
        memoryview(data)[dataset_start:],
        max_bytes=max_inflated_bytes,
        cancellation=cancellation,
        what="the deflated DICOM dataset",
    )
    cancellation.check()
    with reading_client_bytes("the inflated DICOM dataset is corrupt or truncated"):
        # The dataset itself, not dcmread: dcmread would take group 0002 elements at the start of the
        # inflated bytes as File Meta, and a nested "deflated" there would be inflated again, unbounded.
        body = read_dataset(inflated, is_implicit_VR=False, is_little_endian=True)
        return FileDataset(inflated, body, preamble, file_meta, is_implicit_VR=False, is_little_endian=True)


def _uncompressed_syntax(dataset: Dataset) -> UID:
    implicit_vr, little_endian = dataset.original_encoding
    if implicit_vr:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little_endian is not False else ExplicitVRBigEndian


def _past_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != _FILE_META_GROUP
