"""PALETTE COLOR pixels to 8-bit RGB through the file's lookup tables, with segmented tables bounded first.

pydicom applies the tables. Segmented tables (PS3.3 C.7.9.2) are a compression of their own: a linear
segment of three words expands to up to 65,535 entries, and indirect segments repeat earlier ones, so a
megabyte of segments could expand to billions of Python ints inside pydicom before anything checks the
result. Their expanded length is counted here first, without expanding them (no library offers that),
and a table longer than its descriptor allows is refused.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut

from app.imaging.errors import UnreadableImageError
from app.imaging.fence import reading_client_bytes

MAX_LUT_ENTRIES = 2**16
# Indirect segments may refer to segments that are themselves indirect; real tables do not nest deeply.
_MAX_INDIRECT_DEPTH = 4
# Segments visited while counting, zero-length ones included, so that counting is bounded in time too.
_MAX_SEGMENTS_VISITED = 4 * MAX_LUT_ENTRIES
_SEGMENTED = (
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "SegmentedAlphaPaletteColorLookupTableData",
)


def palette_to_rgb(stored: np.ndarray, dataset: Dataset) -> np.ndarray:
    bits = _descriptor_bits(dataset)
    if any(keyword in dataset for keyword in _SEGMENTED):
        _check_segmented_tables(dataset, bits)
    with reading_client_bytes("the PALETTE COLOR image's lookup tables are missing or invalid"):
        colours = apply_color_lut(stored, dataset)
    # An alpha table, when there is one, has no place in the model's picture.
    rgb: np.ndarray = np.ascontiguousarray(colours[..., :3])
    if bits <= 8 and rgb.dtype == np.uint8:
        return rgb
    scaled: np.ndarray = np.clip(np.rint(rgb.astype(np.float32) * (255.0 / float(2**bits - 1))), 0, 255)
    return scaled.astype(np.uint8)


def _descriptor_bits(dataset: Dataset) -> int:
    descriptor = dataset.get("RedPaletteColorLookupTableDescriptor")
    if (
        isinstance(descriptor, Sequence)
        and len(descriptor) == 3
        and all(isinstance(value, int) for value in descriptor)
        and descriptor[2] in (8, 16)
    ):
        return int(descriptor[2])
    raise UnreadableImageError("the PALETTE COLOR image has no valid lookup table descriptor")


def _check_segmented_tables(dataset: Dataset, bits: int) -> None:
    little_endian = dataset.original_encoding[1] is not False
    word = "B" if bits == 8 else "H"
    for keyword in _SEGMENTED:
        if keyword not in dataset:
            continue
        with reading_client_bytes("the PALETTE COLOR image's segmented lookup tables are invalid"):
            raw = bytes(dataset[keyword].value or b"")
            count = len(raw) // struct.calcsize(word)
            words = struct.unpack(
                f"{'<' if little_endian else '>'}{count}{word}", raw[: count * struct.calcsize(word)]
            )
        if _expanded_length(words, word, little_endian, MAX_LUT_ENTRIES) > MAX_LUT_ENTRIES:
            raise UnreadableImageError(
                f"a segmented palette lookup table expands to more than {MAX_LUT_ENTRIES} entries "
                "or nests its indirect segments too deeply"
            )


def _expanded_length(words: tuple[int, ...], word: str, little_endian: bool, limit: int) -> int:
    """How many entries the segments expand to, counted up to just past `limit`."""
    visited = 0

    def count(start: int, max_segments: int | None, depth: int) -> int:
        nonlocal visited
        total, offset, segments = 0, start, 0
        while offset + 1 < len(words) and total <= limit:
            visited += 1
            if visited > _MAX_SEGMENTS_VISITED or depth > _MAX_INDIRECT_DEPTH:
                return limit + 1
            opcode, length = words[offset], words[offset + 1]
            if opcode == 0:  # discrete: `length` values follow
                total, offset = total + length, offset + 2 + length
            elif opcode == 1:  # linear: one value follows, `length` entries result
                total, offset = total + length, offset + 3
            elif opcode == 2:  # indirect: repeat `length` segments found at an offset that follows
                width = 4 if word == "B" else 2
                if offset + 2 + width > len(words):
                    raise UnreadableImageError("a segmented palette lookup table ends inside a segment")
                parts = words[offset + 2 : offset + 2 + width]
                # pydicom expands an indirect segment from the words it was itself handed, so a nested
                # indirect offset counts from the start of its enclosing expansion.
                total += count(start + _indirect_offset(parts, word, little_endian), length, depth + 1)
                offset += 2 + width
            else:
                raise UnreadableImageError(f"a segmented palette lookup table has a segment of type {opcode}")
            segments += 1
            if max_segments is not None and segments == max_segments:
                break
        return total

    return count(0, None, 0)


def _indirect_offset(parts: tuple[int, ...], word: str, little_endian: bool) -> int:
    # The layout pydicom reads (PS3.3 C.7.9.2.3): two 16-bit words, least significant first, or four bytes
    # in an order that depends on the endianness.
    if word == "H":
        return parts[1] << 16 | parts[0]
    order = (3, 2, 1, 0) if little_endian else (2, 3, 0, 1)
    b0, b1, b2, b3 = (parts[index] for index in order)
    return (b0 << 8 | b1) << 16 | (b2 << 8 | b3)
