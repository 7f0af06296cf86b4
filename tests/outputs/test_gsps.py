"""Presentation states parsed back with pydicom and highdicom: they reference the source, in its study, and
draw the boxes where they were found."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from app.imaging import DicomSource, ImageLimits, decode_image
from app.outputs.dicom_sr import Author
from app.outputs.gsps import LAYER, presentation_state
from app.outputs.overlay import Annotation
from tests.conftest import pydicom_file
from tests.corpus import part10, synthetic_ct
from tests.dicom_validator import dciodvfy_errors

LIMITS = ImageLimits(max_bytes=1 << 26, max_pixels=1 << 26)
AUTHOR = Author(model="MBZUAI/MedMO-8B-Next", revision="abc123")
BOXES = [Annotation("Nodule", (10.5, 12.0, 40.0, 50.0)), Annotation(None, (30.0, 32.0, 60.0, 64.0))]

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)


def source(name: str, **options: object) -> DicomSource:
    decoded = decode_image(pydicom_file(name), LIMITS, **options)  # type: ignore[arg-type]
    assert decoded.dicom is not None
    return decoded.dicom


def test_the_state_references_the_source_in_its_study_and_patient() -> None:
    ct = source("CT_small.dcm", window="lung")
    state = pydicom.dcmread(io.BytesIO(presentation_state([ct], AUTHOR, BOXES)))
    assert state.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    assert state.StudyInstanceUID == ct.study_instance_uid
    assert state.PatientID == ct.header.PatientID
    assert state.PatientName == ct.header.PatientName
    assert state.SeriesInstanceUID != ct.series_instance_uid
    (series,) = state.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == ct.series_instance_uid
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ct.sop_instance_uid
    assert state.ContentLabel == LAYER
    assert state.PresentationCreationDate


def test_each_box_is_a_closed_rectangle_in_the_source_pixels_with_its_label() -> None:
    state = pydicom.dcmread(io.BytesIO(presentation_state([source("CT_small.dcm")], AUTHOR, BOXES)))
    (annotation,) = state.GraphicAnnotationSequence
    assert annotation.GraphicLayer == LAYER
    rectangles = [list(item.GraphicData) for item in annotation.GraphicObjectSequence]
    assert rectangles == [
        [10.5, 12.0, 40.0, 12.0, 40.0, 50.0, 10.5, 50.0, 10.5, 12.0],
        [30.0, 32.0, 60.0, 32.0, 60.0, 64.0, 30.0, 64.0, 30.0, 32.0],
    ]
    assert all(
        item.GraphicType == "POLYLINE" and item.GraphicAnnotationUnits == "PIXEL"
        for item in annotation.GraphicObjectSequence
    )
    assert [item.UnformattedTextValue for item in annotation.TextObjectSequence] == ["Nodule", "finding"]
    assert state.GraphicLayerSequence[0].GraphicLayerDescription.endswith("MBZUAI/MedMO-8B-Next@abc123")


def test_the_window_the_image_was_shown_with_is_the_states() -> None:
    state = pydicom.dcmread(
        io.BytesIO(presentation_state([source("CT_small.dcm", window="40,400")], AUTHOR, BOXES))
    )
    (voi,) = state.SoftcopyVOILUTSequence
    assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (40.0, 400.0)
    assert float(state.RescaleIntercept) == float(source("CT_small.dcm").header.RescaleIntercept)


def multiframe_grayscale(frames: int) -> bytes:
    dataset = synthetic_ct(64, 64)
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = (
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    )
    dataset.NumberOfFrames = frames
    noise = np.random.default_rng(0).integers(0, 1000, (frames, 64, 64), dtype=np.int16)
    dataset.PixelData = noise.tobytes()
    return part10(dataset)


def test_a_frame_of_a_multiframe_source_is_referenced_by_number() -> None:
    decoded = decode_image(multiframe_grayscale(5), LIMITS, frame=3)
    assert decoded.dicom is not None
    multiframe = decoded.dicom
    state = pydicom.dcmread(io.BytesIO(presentation_state([multiframe], AUTHOR, BOXES[:1])))
    assert state.GraphicAnnotationSequence[0].ReferencedImageSequence[0].ReferencedFrameNumber == 3


def test_a_flat_image_gets_a_state_without_a_window() -> None:
    dataset = synthetic_ct(64, 64)
    dataset.PixelData = np.zeros((64, 64), dtype=np.int16).tobytes()
    decoded = decode_image(part10(dataset), LIMITS)
    assert decoded.dicom is not None
    state = pydicom.dcmread(io.BytesIO(presentation_state([decoded.dicom], AUTHOR, BOXES)))
    assert "SoftcopyVOILUTSequence" not in state  # a window of width 0 is no window: the viewer's own applies


def test_the_state_passes_dciodvfy_with_no_error(tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert dciodvfy_errors(presentation_state([source(name)], AUTHOR, BOXES), tmp_path) == []


def state_of(dataset: pydicom.Dataset) -> pydicom.Dataset:
    decoded = decode_image(part10(dataset), LIMITS)
    assert decoded.dicom is not None
    return pydicom.dcmread(io.BytesIO(presentation_state([decoded.dicom], AUTHOR, BOXES)))


def test_the_series_has_the_images_body_part_and_side() -> None:
    knee = synthetic_ct(64, 64)
    knee.BodyPartExamined, knee.Laterality = "KNEE", "L"
    state = state_of(knee)
    assert (state.BodyPartExamined, state.Laterality) == ("KNEE", "L")
    knee.Laterality, knee.ImageLaterality = "", "R"  # the image's own side when the series has none
    assert state_of(knee).Laterality == "R"


def test_an_unpaired_body_part_has_no_laterality_and_an_unknown_one_an_empty_one() -> None:
    chest = synthetic_ct(64, 64)
    chest.BodyPartExamined = "CHEST"
    assert "Laterality" not in state_of(chest)
    unknown = state_of(synthetic_ct(64, 64))  # no body part: whether it is paired is unknown
    assert unknown.Laterality == ""
    assert "BodyPartExamined" not in unknown
