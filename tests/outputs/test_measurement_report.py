"""TID 1500 measurement reports read back with pydicom and highdicom: who made them, what they found where,
and what the model wrote; the conformance of every kind of source is in test_conformance.py."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID

from app import __version__
from app.imaging import DicomSource, ImageLimits, decode_image
from app.outputs.dicom_sr import Author, ReportSourceError, structured_report
from app.outputs.measurement_report import (
    FINDING_CODES,
    NOTHING_REPORTED,
    QUALITATIVE_EVALUATIONS,
    check_measurement_sources,
    finding_code,
    measurement_report,
)
from app.outputs.results import Algorithm, Region, Results, Score
from tests.conftest import pydicom_file
from tests.corpus import part10, synthetic_ct
from tests.dicom_validator import dciodvfy_errors
from tests.outputs.test_gsps import multiframe_grayscale

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)

LIMITS = ImageLimits(max_bytes=1 << 26, max_pixels=1 << 26)
ALGORITHM = Algorithm(model="MBZUAI/MedMO-8B-Next", revision="abc123")
VQA = Results(task="vqa", texts=(("Question", "Is there a mass?"), ("Answer", "No mass is seen.")))
GROUND = Results(task="ground", regions=(Region("nodule", 0, (10.0, 12.0, 40.0, 50.0)),))


def decoded(data: bytes, frame: int | None = None) -> DicomSource:
    source = decode_image(data, LIMITS, frame=frame).dicom
    assert source is not None
    return source


def ct() -> DicomSource:
    return decoded(pydicom_file("CT_small.dcm"))


def read(document: bytes) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(document)))


def report_of(document: bytes) -> hd.sr.MeasurementReport:
    return hd.sr.MeasurementReport.from_sequence([read(document)], copy=False)


def children(item: Dataset, concept: hd.sr.CodedConcept | Code) -> list[Dataset]:
    return [
        child for child in item.ContentSequence if child.ConceptNameCodeSequence[0].CodeValue == concept.value
    ]


def test_the_codes_are_pydicoms_and_a_label_is_coded_only_when_it_names_one() -> None:
    assert all(code.scheme_designator in {"SCT", "DCM"} for code in FINDING_CODES.values())
    assert finding_code("  Pleural   EFFUSION ") == codes.SCT.PleuralEffusion
    assert finding_code("small left pleural effusion") is None  # more than the code says: text only
    assert finding_code("fracture") is None  # not in pydicom's dictionary: not typed in here


def test_a_report_is_a_preliminary_tid_1500_in_the_sources_study_by_the_model() -> None:
    source = ct()
    document = read(measurement_report([source], GROUND, ALGORITHM, title="ground"))
    assert document.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert document.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert document.ConceptNameCodeSequence[0].CodeValue == codes.DCM.ImagingMeasurementReport.value
    assert (document.PreliminaryFlag, document.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    assert (document.StudyInstanceUID, document.PatientID) == (
        source.study_instance_uid,
        source.header.PatientID,
    )
    assert document.SeriesInstanceUID != source.series_instance_uid
    assert document.Manufacturer == "MedMO Serve"
    assert list(document.SoftwareVersions) == [f"MedMO Serve {__version__}", "MBZUAI/MedMO-8B-Next@abc123"]


def test_the_device_observer_names_the_service_and_model_with_the_uid_of_the_tid_2000_reports() -> None:
    source = ct()
    report = report_of(measurement_report([source], GROUND, ALGORITHM, title="ground"))
    (observer,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert (attributes.name, attributes.manufacturer_name) == ("MedMO Serve", "MedMO Serve")
    assert attributes.model_name == "MBZUAI/MedMO-8B-Next@abc123"
    basic = pydicom.dcmread(
        io.BytesIO(structured_report([source], Author(ALGORITHM.model, ALGORITHM.revision), [], "vqa"))
    )
    device_uid = next(item.UID for item in basic.ContentSequence if item.ValueType == "UIDREF")
    assert attributes.uid == device_uid
    (group,) = report.get_planar_roi_measurement_groups()
    algorithm = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in group[0].ContentSequence
                 if item.ValueType == "TEXT" and item.RelationshipType == "HAS CONCEPT MOD"}  # fmt: skip
    assert algorithm == {"Algorithm Name": "MBZUAI/MedMO-8B-Next", "Algorithm Version": "abc123"}


def test_a_box_is_a_region_of_its_image_with_a_coded_finding_and_the_label_as_written() -> None:
    source = ct()
    report = report_of(measurement_report([source], GROUND, ALGORITHM, title="ground"))
    (group,) = report.get_planar_roi_measurement_groups(finding_type=codes.SCT.Nodule)
    assert group.tracking_identifier == "finding 1"
    assert group.roi is not None
    assert group.roi.value.tolist() == [[10, 12], [40, 12], [40, 50], [10, 50], [10, 12]]
    referenced = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.sop_instance_uid
    assert "ReferencedFrameNumber" not in referenced  # one frame: nothing to choose
    assert [item.TextValue for item in children(group[0], codes.DCM.Finding) if item.ValueType == "TEXT"] == [
        "nodule"
    ]


def test_each_report_gives_each_finding_a_fresh_tracking_uid() -> None:
    source = ct()
    results = Results(task="ground", regions=(GROUND.regions[0], GROUND.regions[0]))
    uids = [
        group.tracking_uid
        for _ in range(2)
        for group in report_of(
            measurement_report([source], results, ALGORITHM, title="ground")
        ).get_planar_roi_measurement_groups()
    ]
    assert len(set(uids)) == 4


def test_a_frame_of_a_multiframe_source_is_referenced_by_number() -> None:
    source = decoded(multiframe_grayscale(5), frame=3)
    report = report_of(measurement_report([source], GROUND, ALGORITHM, title="ground"))
    (group,) = report.get_planar_roi_measurement_groups()
    assert group.roi is not None
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 3


def test_a_score_is_a_probability_over_the_images_it_was_given() -> None:
    source = ct()
    results = Results(task="classify", scores=(Score("Cardiomegaly", 0.8), Score("normal", 0.2)))
    report = report_of(measurement_report([source], results, ALGORITHM, title="classify"))
    cardiomegaly, normal = report.get_image_measurement_groups()
    assert (cardiomegaly.tracking_identifier, normal.tracking_identifier) == ("finding 1", "finding 2")
    assert (cardiomegaly.finding_type, normal.finding_type) == (codes.SCT.Cardiomegaly, None)
    (probability,) = cardiomegaly.get_measurements(name=codes.DCM.Probability)
    assert probability.value == 0.8
    assert probability.unit == hd.sr.CodedConcept("{ratio}", "UCUM", "ratio")
    (image,) = children(cardiomegaly[0], codes.DCM.SourceOfMeasurement)
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.sop_instance_uid


def test_an_answer_without_regions_is_a_report_of_qualitative_evaluations(tmp_path: Path) -> None:
    document = measurement_report([ct()], VQA, ALGORITHM, title="vqa")
    assert dciodvfy_errors(document, tmp_path) == []
    root = read(document)
    assert children(root, codes.DCM.ImagingMeasurements) == []
    (evaluations,) = children(root, QUALITATIVE_EVALUATIONS)
    written = [
        (item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue) for item in evaluations.ContentSequence
    ]
    assert written == [("Request", "Is there a mass?"), ("Finding", "No mass is seen.")]
    assert report_of(document).get_planar_roi_measurement_groups() == []


def test_a_heading_without_a_concept_is_a_comment_and_nothing_found_is_said() -> None:
    other = Results(task="report", texts=(("Technique", "Portable AP."), ("Impression", "")))
    (evaluations,) = children(
        read(measurement_report([ct()], other, ALGORITHM, title="r")), QUALITATIVE_EVALUATIONS
    )
    assert [item.TextValue for item in evaluations.ContentSequence] == ["Technique: Portable AP."]
    empty = read(measurement_report([ct()], Results(task="ground"), ALGORITHM, title="ground"))
    (evaluations,) = children(empty, QUALITATIVE_EVALUATIONS)
    assert [item.TextValue for item in evaluations.ContentSequence] == [NOTHING_REPORTED]


def test_the_image_library_lists_each_instance_once_with_what_its_header_holds() -> None:
    source = ct()
    stripped = synthetic_ct(64, 64)  # a CT without geometry: still listed, by identity and size
    flat = decoded(part10(stripped))
    document = read(measurement_report([source, source, flat], GROUND, ALGORITHM, title="ground"))
    (library,) = children(document, codes.DCM.ImageLibrary)
    images = [
        image
        for group in library.ContentSequence
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    ]
    assert [image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for image in images] == [
        source.sop_instance_uid,
        flat.sop_instance_uid,
    ]
    described = [
        {item.ConceptNameCodeSequence[0].CodeMeaning for item in image.ContentSequence} for image in images
    ]
    assert {"Horizontal Pixel Spacing", "Slice Thickness", "Pixel Data Rows"} <= described[0]
    assert "Horizontal Pixel Spacing" not in described[1]
    assert "Pixel Data Rows" in described[1]


def test_a_prior_studys_image_is_other_evidence() -> None:
    current = synthetic_ct(64, 64)
    prior = synthetic_ct(64, 64, seed=1)
    prior.SOPInstanceUID = prior.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.11")
    prior.StudyInstanceUID, prior.SeriesInstanceUID = (
        "1.2.826.0.1.3680043.8.498.12",
        "1.2.826.0.1.3680043.8.498.13",
    )
    sources = [decoded(part10(current)), decoded(part10(prior))]
    document = read(measurement_report(sources, GROUND, ALGORITHM, title="ground"))
    assert document.StudyInstanceUID == current.StudyInstanceUID
    (other,) = document.PertinentOtherEvidenceSequence
    assert other.StudyInstanceUID == prior.StudyInstanceUID


def test_a_source_without_a_study_is_refused_before_the_model_runs() -> None:
    orphan = synthetic_ct(64, 64)
    del orphan.StudyInstanceUID
    with pytest.raises(ReportSourceError, match="Study Instance UID"):
        check_measurement_sources([decoded(part10(orphan))])
    check_measurement_sources([ct()])
    check_measurement_sources([decoded(multiframe_grayscale(3), frame=2)])
