"""DICOM decoding on real files shipped with pydicom, checked against the standard's formulas."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import MPEG2MPML

from app.imaging import (
    ImageLimits,
    UnreadableImageError,
    UnsupportedImageError,
    UnusableImageError,
    decode_image,
)
from app.imaging.bounds import Cancellation
from app.imaging.dicom import decode_dicom
from app.imaging.dicom_file import read_dicom
from tests.conftest import png_bytes, pydicom_file

LIMITS = ImageLimits(max_bytes=64 * 1024 * 1024, max_pixels=50_000_000)


def dataset(name: str) -> Dataset:
    return read_dicom(pydicom_file(name), max_inflated_bytes=LIMITS.max_bytes, cancellation=Cancellation())


def gray(picture: object) -> np.ndarray:
    pixels = np.asarray(picture)
    assert (pixels[..., 0] == pixels[..., 1]).all()
    return pixels[..., 0].astype(int)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, written out independently of the code under test."""
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255
    out = np.where(values <= low, 0, np.where(values > high, 255, out))
    return np.rint(out).astype(int)


def test_ct_stored_window_in_hounsfield_units() -> None:
    # A CT slice with rescale intercept -1024 and a stored window of centre 40, width 400.
    source = dataset("dicomdirtests/98892001/CT5N/2062")
    raw = source.pixel_array.astype(np.float64)
    hounsfield = raw * float(source.RescaleSlope) + float(source.RescaleIntercept)
    picture, info = decode_dicom(source, max_pixels=LIMITS.max_pixels, frame=None, window=None)
    assert (info.window.center, info.window.width, info.window.source) == (40.0, 400.0, "file")  # type: ignore[union-attr]
    expected = linear_window(hounsfield, 40.0, 400.0)
    assert np.abs(gray(picture) - expected).max() <= 1
    assert 0 < expected.mean() < 255  # the window actually cuts through this slice's values


def test_client_window_preset_overrides_the_file() -> None:
    source = dataset("CT_small.dcm")
    hounsfield = source.pixel_array.astype(np.float64) * float(source.RescaleSlope) + float(
        source.RescaleIntercept
    )
    picture, info = decode_dicom(source, max_pixels=LIMITS.max_pixels, frame=None, window="lung")
    assert (info.window.center, info.window.width, info.window.source) == (-600.0, 1500.0, "lung")  # type: ignore[union-attr]
    assert np.abs(gray(picture) - linear_window(hounsfield, -600.0, 1500.0)).max() <= 1


def test_explicit_window_and_signed_pixels() -> None:
    source = dataset("CT_small.dcm")
    assert source.PixelRepresentation == 1
    hounsfield = source.pixel_array.astype(np.float64) * float(source.RescaleSlope) + float(
        source.RescaleIntercept
    )
    picture, info = decode_dicom(source, max_pixels=LIMITS.max_pixels, frame=None, window="40,400")
    assert info.window.source == "request"  # type: ignore[union-attr]
    assert np.abs(gray(picture) - linear_window(hounsfield, 40.0, 400.0)).max() <= 1


def test_without_any_window_the_values_present_are_stretched() -> None:
    decoded = decode_image(pydicom_file("CT_small.dcm"), LIMITS)
    pixels = gray(decoded.picture)
    assert (pixels.min(), pixels.max()) == (0, 255)
    assert decoded.dicom is not None
    assert decoded.dicom.window.source == "full_range"  # type: ignore[union-attr]


def test_monochrome1_is_inverted() -> None:
    source = dataset("dicomdirtests/77654033/CR1/6154")
    assert source.PhotometricInterpretation == "MONOCHROME1"
    values = source.pixel_array.astype(np.float64) * float(source.get("RescaleSlope", 1)) + float(
        source.get("RescaleIntercept", 0)
    )
    center, width = float(source.WindowCenter), float(source.WindowWidth)
    picture, _ = decode_dicom(source, max_pixels=LIMITS.max_pixels, frame=None, window=None)
    assert np.abs(gray(picture) - (255 - linear_window(values, center, width))).max() <= 1


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_lossless_compression_decodes_to_the_same_picture(compressed: str) -> None:
    reference = np.asarray(decode_image(pydicom_file("MR_small.dcm"), LIMITS).picture)
    assert np.array_equal(np.asarray(decode_image(pydicom_file(compressed), LIMITS).picture), reference)


@pytest.mark.parametrize(
    "name",
    [
        "JPGExtended.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "SC_rgb_gdcm_KY.dcm",
        "SC_rgb_jls_lossy_line.dcm",
        "693_J2KI.dcm",
    ],
)
def test_compressed_transfer_syntaxes(name: str) -> None:
    decoded = decode_image(pydicom_file(name), LIMITS)
    assert decoded.picture.mode == "RGB"
    assert np.asarray(decoded.picture).std() > 0


def test_palette_colour_through_its_lookup_table() -> None:
    source = dataset("examples_palette.dcm")
    expected = apply_color_lut(source.pixel_array, source)
    picture, info = decode_dicom(source, max_pixels=LIMITS.max_pixels, frame=None, window=None)
    assert info.window is None
    bits = int(source.RedPaletteColorLookupTableDescriptor[2])
    scaled = np.rint(expected.astype(np.float64) * 255 / (2**bits - 1)).astype(int)
    assert np.abs(np.asarray(picture).astype(int) - scaled).max() <= 1


def test_ybr_multi_frame_reads_the_middle_frame_unless_told() -> None:
    data = pydicom_file("examples_ybr_color.dcm")
    middle = decode_image(data, LIMITS)
    assert middle.dicom is not None
    assert (middle.dicom.frame, middle.dicom.frames) == (16, 30)
    first = decode_image(data, LIMITS, frame=1)
    assert first.dicom is not None
    assert first.dicom.frame == 1
    assert not np.array_equal(np.asarray(first.picture), np.asarray(middle.picture))
    with pytest.raises(UnusableImageError, match="frames 1 to 30"):
        decode_image(data, LIMITS, frame=31)


def test_rgb_frames_match_pydicom() -> None:
    source = pydicom.dcmread(io.BytesIO(pydicom_file("SC_rgb_rle_2frame.dcm")))
    second = decode_image(pydicom_file("SC_rgb_rle_2frame.dcm"), LIMITS, frame=2)
    assert np.array_equal(np.asarray(second.picture), source.pixel_array[1])


@pytest.mark.parametrize(
    "name", ["rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm", "rtstruct.dcm", "reportsi.dcm"]
)
def test_objects_without_an_image_are_refused_by_kind(name: str) -> None:
    with pytest.raises(UnusableImageError, match="holds no image"):
        decode_image(pydicom_file(name), LIMITS)


def test_detected_by_content_even_without_a_preamble() -> None:
    with pytest.raises(UnusableImageError, match="RT Ion Plan"):
        decode_image(pydicom_file("ExplVR_LitEndNoMeta.dcm"), LIMITS)


def test_truncated_corrupt_and_undecodable_pixel_data() -> None:
    with pytest.raises(UnreadableImageError, match="fewer than the 8192 its header declares"):
        decode_image(pydicom_file("MR_truncated.dcm"), LIMITS)
    # A supported syntax whose data the decoders refuse is the upload's fault (400), not a gap here (415).
    with pytest.raises(UnreadableImageError, match=r"JPEG 2000 .* cannot be decoded: it is corrupt"):
        decode_image(pydicom_file("JPEG2000-embedded-sequence-delimiter.dcm"), LIMITS)
    mpeg = dataset("CT_small.dcm")
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(UnsupportedImageError, match="MPEG2 Main Profile / Main Level cannot be decoded here"):
        decode_dicom(mpeg, max_pixels=LIMITS.max_pixels, frame=None, window=None)


def test_window_and_frame_only_apply_where_they_mean_something() -> None:
    with pytest.raises(UnusableImageError, match="grayscale"):
        decode_image(pydicom_file("SC_rgb_rle.dcm"), LIMITS, window="lung")
    with pytest.raises(UnusableImageError, match="DICOM images only"):
        decode_image(png_bytes(), LIMITS, frame=1)


def test_the_kept_header_has_no_pixel_data() -> None:
    decoded = decode_image(pydicom_file("CT_small.dcm"), LIMITS)
    assert decoded.dicom is not None
    assert "PixelData" not in decoded.dicom.header
    assert decoded.dicom.header.StudyInstanceUID == decoded.dicom.study_instance_uid
