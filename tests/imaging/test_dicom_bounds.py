"""DICOM decoding held to its limits: deflate, headerless datasets, compressed frames, segmented palettes."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import _expand_segmented_lut

from app.imaging import ImageLimits, ImageTooLargeError, UnreadableImageError, decode_image
from app.imaging.bounds import Cancellation
from app.imaging.dicom import decode_dicom
from app.imaging.dicom_file import read_dicom
from app.imaging.dicom_palette import _expanded_length
from tests.conftest import pydicom_file
from tests.corpus import (
    MIB,
    deflate_bomb,
    headerless,
    j2k_frame_lying,
    jpeg_frame_lying,
    modified,
    part10,
    segmented_palette_bomb,
    synthetic_ct,
)

LIMITS = ImageLimits(max_bytes=64 * MIB, max_pixels=50_000_000)


def picture_of(data: bytes, limits: ImageLimits = LIMITS) -> np.ndarray:
    return np.asarray(decode_image(data, limits).picture)


def test_a_deflated_file_decodes_as_pydicom_reads_it() -> None:
    ours = decode_image(pydicom_file("image_dfl.dcm"), LIMITS)
    read_by_pydicom = pydicom.dcmread(io.BytesIO(pydicom_file("image_dfl.dcm")))
    theirs, _ = decode_dicom(read_by_pydicom, max_pixels=LIMITS.max_pixels, frame=None, window=None)
    assert ours.dicom is not None
    assert ours.dicom.sop_instance_uid == read_by_pydicom.SOPInstanceUID
    assert np.array_equal(np.asarray(ours.picture), np.asarray(theirs))


def test_a_deflated_file_is_inflated_no_further_than_the_upload_limit() -> None:
    data = pydicom_file("image_dfl.dcm")  # about 262 kB once inflated
    assert decode_image(data, ImageLimits(max_bytes=300_000, max_pixels=LIMITS.max_pixels)).width == 512
    with pytest.raises(ImageTooLargeError, match="inflates to more than the limit of 200000 bytes"):
        decode_image(data, ImageLimits(max_bytes=200_000, max_pixels=LIMITS.max_pixels))
    with pytest.raises(ImageTooLargeError, match="inflates to more than"):
        decode_image(deflate_bomb(1024 * MIB), LIMITS)  # 1 MB that would inflate to 1 GiB


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_a_dataset_without_its_part10_header_decodes_like_the_file(implicit_vr: bool) -> None:
    source = read_dicom(
        pydicom_file("CT_small.dcm"), max_inflated_bytes=LIMITS.max_bytes, cancellation=Cancellation()
    )
    bare = headerless(source, implicit_vr=implicit_vr)
    assert b"DICM" not in bare[:200]
    assert np.array_equal(picture_of(bare), picture_of(pydicom_file("CT_small.dcm")))


@pytest.mark.parametrize(
    ("upload", "message"),
    [
        (
            j2k_frame_lying(64, 60_000),
            "frame is 60000x60000 pixels with 1 samples, but the DICOM header declares 64x64",
        ),
        (
            jpeg_frame_lying(64, 60_000),
            "frame is 60000x60000 pixels with 1 samples, but the DICOM header declares 64x64",
        ),
        (
            jpeg_frame_lying(64, 32),
            "frame is 32x32 pixels with 1 samples, but the DICOM header declares 64x64",
        ),
    ],
)
def test_a_compressed_frame_is_sized_from_its_own_header_before_it_is_decoded(
    upload: bytes, message: str
) -> None:
    # Decoded, the 60000x60000 frames would fill 3.6 billion pixels: the refusal has to come first.
    with pytest.raises(UnreadableImageError, match=message):
        decode_image(upload, LIMITS)


def test_uncompressed_pixel_data_shorter_than_declared_is_refused_before_decoding() -> None:
    source = synthetic_ct()
    source.Rows = 4000  # 4000 x 64 x 2 bytes declared, 64 x 64 x 2 present
    with pytest.raises(
        UnreadableImageError, match="holds 8192 bytes, fewer than the 512000 its header declares"
    ):
        decode_image(part10(source), LIMITS)


def test_a_segmented_palette_decodes_like_the_same_palette_stored_whole() -> None:
    expected = picture_of(pydicom_file("examples_palette.dcm"))
    segmented = pydicom.dcmread(io.BytesIO(pydicom_file("examples_palette.dcm")))
    for colour in ("Red", "Green", "Blue"):
        entries = np.frombuffer(segmented[f"{colour}PaletteColorLookupTableData"].value, dtype="<u2")
        delattr(segmented, f"{colour}PaletteColorLookupTableData")
        words = np.concatenate([[0, len(entries)], entries]).astype("<u2")  # one discrete segment
        segmented.add_new(f"Segmented{colour}PaletteColorLookupTableData", "OW", words.tobytes())
    assert np.array_equal(picture_of(part10(segmented)), expected)


def test_a_segmented_palette_that_expands_past_its_descriptor_is_refused_before_expanding() -> None:
    # 20,000 linear segments of 65,535 entries: pydicom would build a list of 1.3 billion ints.
    with pytest.raises(UnreadableImageError, match="expands to more than 65536 entries"):
        decode_image(modified(segmented_palette_bomb), LIMITS)


def test_the_segment_count_agrees_with_pydicoms_expansion() -> None:
    agreed = 0
    for seed in range(40):
        table = random_segmented_table(np.random.default_rng(seed))
        try:
            expanded = len(_expand_segmented_lut(table, "<H"))
        except (ValueError, RecursionError):
            # pydicom refuses some random tables (a nested indirect offset counts from its enclosing
            # segment, and may land on data); inside the service that refusal is the fenced 400.
            continue
        assert _expanded_length(table, "H", True, limit=10**6) == expanded, f"seed {seed}"
        agreed += 1
    assert agreed >= 20


def random_segmented_table(rng: np.random.Generator) -> tuple[int, ...]:
    words: list[int] = [0, 3, *rng.integers(0, 1000, 3).tolist()]  # tables start with a discrete segment
    starts = [0]
    for _ in range(int(rng.integers(1, 12))):
        starts.append(len(words))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            count = int(rng.integers(0, 5))
            words += [0, count, *rng.integers(0, 1000, count).tolist()]
        elif kind == 1:
            words += [1, int(rng.integers(1, 300)), int(rng.integers(0, 1000))]
        else:  # repeat one or two of the segments before this one
            target = starts[int(rng.integers(0, len(starts) - 1))]
            words += [2, int(rng.integers(1, 3)), target & 0xFFFF, target >> 16]
    return tuple(words)
