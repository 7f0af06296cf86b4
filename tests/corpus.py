"""Malformed and hostile uploads, generated here: images, DICOM objects, and the bombs among them.

Nothing binary is committed: every object is built by this code from numpy arrays, Pillow and pydicom,
then broken on purpose. The DICOM builders start from a small synthetic CT slice that decodes fine, so
each hostile variant differs from a good one in exactly what it is named after.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
)

MIB = 1024 * 1024


# --- ordinary images ---


def encoded(picture: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunk_before_data(kind: bytes, body: bytes) -> bytes:
    """A valid 64x64 PNG with one more chunk right after its header."""
    png = encoded(Image.new("L", (64, 64), 90), "PNG")
    return png[:33] + png_chunk(kind, body) + png[33:]


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and whose data is a few zero rows."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (min(width, 4096) + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF) rewritten to declare width x height."""
    offset = 2
    while jpeg[offset + 1] not in (0xC0, 0xC1, 0xC2, 0xC3):
        offset += 2 + struct.unpack(">H", jpeg[offset + 2 : offset + 4])[0]
    return jpeg[: offset + 5] + struct.pack(">HH", height, width) + jpeg[offset + 9 :]


def j2k_with_size(codestream: bytes, width: int, height: int) -> bytes:
    """The JPEG 2000 codestream with its SIZ segment (image and tile size) rewritten to width x height."""
    siz = codestream.index(b"\xff\x51")
    # SIZ: marker, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz (32-bit each).
    start = siz + 6
    sizes = struct.pack(">IIIIII", width, height, 0, 0, width, height)
    return codestream[:start] + sizes + codestream[start + 24 :]


# --- DICOM ---


def synthetic_ct(rows: int = 64, columns: int = 64, seed: int = 0) -> Dataset:
    """A small CT slice with patient and study, 16-bit signed, rescaled to Hounsfield units."""
    pixels = np.random.default_rng(seed).integers(-1000, 1500, (rows, columns), dtype=np.int16)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1")
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.1")
    dataset.StudyInstanceUID = UID("1.2.826.0.1.3680043.8.498.2")
    dataset.SeriesInstanceUID = UID("1.2.826.0.1.3680043.8.498.3")
    dataset.PatientName = "Corpus^Case"
    dataset.PatientID = "CORPUS-1"
    dataset.PatientBirthDate = "19700101"
    dataset.PatientSex = "O"
    dataset.StudyDate = "20240101"
    dataset.StudyTime = "120000"
    dataset.Modality = "CT"
    dataset.Rows, dataset.Columns = rows, columns
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
    dataset.PixelRepresentation = 1
    dataset.RescaleSlope, dataset.RescaleIntercept = 1, 0
    dataset.PixelData = pixels.tobytes()
    return dataset


def part10(dataset: Dataset) -> bytes:
    """The dataset as a Part 10 file, written as its File Meta says, with no checks on its content."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def headerless(dataset: Dataset, *, implicit_vr: bool) -> bytes:
    """The dataset alone, without preamble, 'DICM' or File Meta, as some archives export it."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit_vr
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def with_raw_element(data: bytes, tag_number: int, vr: bytes, value: bytes) -> bytes:
    """A Part 10 file (Explicit VR Little Endian) with one element's encoded value replaced by `value`."""
    tag = struct.pack("<HH", tag_number >> 16, tag_number & 0xFFFF)
    start = data.index(tag + vr, 132)
    old_length = struct.unpack("<H", data[start + 6 : start + 8])[0]
    return data[:start] + tag + vr + struct.pack("<H", len(value)) + value + data[start + 8 + old_length :]


def meta_bytes(transfer_syntax: str, sop_class: str = CTImageStorage) -> bytes:
    """Preamble, 'DICM' and File Meta declaring `transfer_syntax`."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.9")
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue()


def explicit_le(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def deflated(dataset_bytes: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(dataset_bytes) + compressor.flush()


def zeros_deflate_stream(prefix: bytes, zeros: int) -> bytes:
    """A raw deflate stream of `prefix` then `zeros` zero bytes, built without holding the zeros.

    A fully flushed block does not refer back to earlier data, so the compressed form of one MiB of zeros
    can be repeated: a 2 GiB stream costs 2 MB here, as it costs an attacker.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    one_mib = block.compress(b"\x00" * MIB) + block.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()  # an empty last block
    return head + one_mib * (zeros // MIB) + final


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A deflated DICOM whose Pixel Data inflates to `inflated_bytes` of zeros."""
    dataset = synthetic_ct()
    del dataset.PixelData
    header = explicit_le(dataset)
    pixel_element = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)
    return meta_bytes(DeflatedExplicitVRLittleEndian) + zeros_deflate_stream(
        header + pixel_element, inflated_bytes
    )


def zero_padded_deflate(padding: int) -> bytes:
    """A valid deflated DICOM, its deflate stream padded with `padding` zero bytes after the dataset."""
    return meta_bytes(DeflatedExplicitVRLittleEndian) + zeros_deflate_stream(
        explicit_le(synthetic_ct()), padding
    )


def nested_deflate() -> bytes:
    """A deflated dataset that starts with File Meta of its own, declaring another deflated dataset."""
    inner = meta_bytes(DeflatedExplicitVRLittleEndian)[132:] + zeros_deflate_stream(b"", 64 * MIB)
    return meta_bytes(DeflatedExplicitVRLittleEndian) + deflated(inner)


def compressed(dataset: Dataset, transfer_syntax: str, frames: list[bytes]) -> bytes:
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    dataset.PixelData = encapsulate(frames)
    dataset["PixelData"].VR = "OB"
    return part10(dataset)


def gray8(rows: int, columns: int, modality: str = "OT") -> Dataset:
    dataset = synthetic_ct(8, 8)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.Modality = modality
    dataset.Rows, dataset.Columns = rows, columns
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    del dataset.RescaleSlope, dataset.RescaleIntercept
    return dataset


def jpeg_frame_lying(declared: int, actual: int) -> bytes:
    """A JPEG baseline DICOM declaring declared x declared pixels whose frame declares actual x actual."""
    jpeg = jpeg_with_size(encoded(Image.new("L", (64, 64), 0), "JPEG", quality=50), actual, actual)
    return compressed(gray8(declared, declared), JPEGBaseline8Bit, [jpeg])


def j2k_frame_lying(declared: int, actual: int) -> bytes:
    """A JPEG 2000 DICOM declaring declared x declared pixels whose few-hundred-byte frame declares actual."""
    codestream = encoded(Image.new("L", (64, 64), 0), "JPEG2000", no_jp2=True)
    return compressed(
        gray8(declared, declared), JPEG2000Lossless, [j2k_with_size(codestream, actual, actual)]
    )


def rle_zeros(rows: int, columns: int) -> bytes:
    """An RLE DICOM of rows x columns 16-bit zeros: kilobytes that decode to 2 x rows x columns bytes."""
    dataset = synthetic_ct(8, 8)
    dataset.Rows, dataset.Columns = rows, columns
    dataset.PixelData = np.zeros((rows, columns), dtype=np.int16).tobytes()
    dataset.compress(RLELossless, encoding_plugin="pydicom")
    return part10(dataset)


def modified(change: Callable[[Dataset], None]) -> bytes:
    dataset = synthetic_ct()
    change(dataset)
    return part10(dataset)


def voi_lut_item(bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [256, 0, bits]
    item.add_new(0x00283006, "OW", np.arange(256, dtype="<u2").tobytes())
    return item


def modality_lut_without_data(dataset: Dataset) -> None:
    del dataset.RescaleSlope, dataset.RescaleIntercept
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "HU"
    dataset.ModalityLUTSequence = Sequence([item])


def palette_without_tables(dataset: Dataset) -> None:
    dataset.PhotometricInterpretation = "PALETTE COLOR"
    dataset.PixelRepresentation = 0


def segmented_palette_bomb(dataset: Dataset) -> None:
    """PALETTE COLOR whose segmented tables are 20,000 linear segments of 65,535 entries each."""
    palette_without_tables(dataset)
    dataset.RedPaletteColorLookupTableDescriptor = [0, 0, 16]
    dataset.GreenPaletteColorLookupTableDescriptor = [0, 0, 16]
    dataset.BluePaletteColorLookupTableDescriptor = [0, 0, 16]
    segments = [0, 1, 7] + [1, 65535, 7] * 20_000  # a discrete start, then linear segments
    data = struct.pack(f"<{len(segments)}H", *segments)
    for colour in ("Red", "Green", "Blue"):
        dataset.add_new(f"Segmented{colour}PaletteColorLookupTableData", "OW", data)


def transfer_syntax(uid: str) -> Callable[[Dataset], None]:
    def change(dataset: Dataset) -> None:
        dataset.file_meta.TransferSyntaxUID = uid
        dataset.PixelData = encapsulate([dataset.PixelData])
        dataset["PixelData"].VR = "OB"

    return change
