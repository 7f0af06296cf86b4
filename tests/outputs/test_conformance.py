"""Every DICOM object the service writes, for sources of several modalities and shapes, passes dciodvfy with no
error: the TID 2000 report, the TID 1500 measurement report and the presentation state. Each measurement
report is read back with highdicom: the findings, boxes and tracking identifiers are the results given."""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComputedRadiographyImageStorage, generate_uid

from app.imaging import DicomSource, ImageLimits, decode_image
from app.outputs.dicom_sr import Author, boxed_finding, container_item, structured_report, text_item
from app.outputs.gsps import presentation_state
from app.outputs.measurement_report import finding_code, measurement_report
from app.outputs.overlay import Annotation
from app.outputs.results import Algorithm, Region, Results, Score
from tests.conftest import pydicom_file
from tests.corpus import part10
from tests.dicom_validator import dciodvfy_errors
from tests.outputs.test_gsps import multiframe_grayscale

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)

LIMITS = ImageLimits(max_bytes=1 << 26, max_pixels=1 << 26)
ALGORITHM = Algorithm(model="MBZUAI/MedMO-8B-Next", revision="abc123")
AUTHOR = Author(model=ALGORITHM.model, revision=ALGORITHM.revision)
# Attributes of the Patient and General Study modules that are Type 2: present, and empty when unknown.
TYPE_2_DELETED = ("PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber", "ReferringPhysicianName")


@dataclass(frozen=True)
class Case:
    name: str
    sources: Sequence[DicomSource]
    grayscale: bool = True  # a presentation state is grayscale only


def decoded(data: bytes, frame: int | None = None) -> DicomSource:
    source = decode_image(data, LIMITS, frame=frame).dicom
    assert source is not None
    return source


def real(name: str) -> Dataset:
    return pydicom.dcmread(io.BytesIO(pydicom_file(name)))


def another_instance(dataset: Dataset, *, new_study: bool = False) -> Dataset:
    """The same patient's image as another instance of the series, or of a later study (a prior's pair)."""
    other = copy.deepcopy(dataset)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    other.InstanceNumber = int(other.get("InstanceNumber") or 1) + 1
    if new_study:
        other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    return other


def without_type_2(dataset: Dataset) -> Dataset:
    stripped = copy.deepcopy(dataset)
    for keyword in TYPE_2_DELETED:
        if keyword in stripped:
            delattr(stripped, keyword)
    return stripped


def knee_radiograph() -> Dataset:
    """A left knee CR in the patient and study of pydicom's CT (pydicom ships no CR or DX): the CR Image
    IOD's modules, checked by dciodvfy below like the real files."""
    ct = real("CT_small.dcm")
    cr = Dataset()
    cr.file_meta = copy.deepcopy(ct.file_meta)
    cr.SOPClassUID = cr.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    cr.SOPInstanceUID = cr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in (
        "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
        "Manufacturer",
    ):  # fmt: skip
        cr.add(copy.deepcopy(ct[keyword]))
    cr.SeriesInstanceUID = generate_uid()
    cr.Modality, cr.SeriesNumber, cr.InstanceNumber = "CR", 2, 1
    cr.BodyPartExamined, cr.Laterality, cr.ViewPosition = "KNEE", "L", "AP"
    cr.PatientOrientation = ["L", "F"]
    cr.ImagerPixelSpacing = [0.2, 0.2]
    cr.ContentDate, cr.ContentTime = ct.StudyDate, ct.StudyTime
    cr.Rows, cr.Columns = 96, 80
    cr.SamplesPerPixel, cr.PhotometricInterpretation = 1, "MONOCHROME2"
    cr.BitsAllocated, cr.BitsStored, cr.HighBit, cr.PixelRepresentation = 16, 12, 11, 0
    cr.PixelData = np.random.default_rng(0).integers(0, 4096, (96, 80), dtype=np.uint16).tobytes()
    return cr


def cases() -> list[Case]:
    ct, mr = real("CT_small.dcm"), real("MR_small.dcm")
    return [
        # Regions on two slices of one series, and on an image and the same patient's prior.
        Case("CT, two slices of a series", [decoded(part10(d)) for d in (ct, another_instance(ct))]),
        Case(
            "CT with a prior study",
            [decoded(part10(ct)), decoded(part10(another_instance(ct, new_study=True)))],
        ),
        Case("MR", [decoded(pydicom_file("MR_small.dcm"))]),
        Case("CR", [decoded(part10(knee_radiograph()))]),
        Case("US, palette colour", [decoded(pydicom_file("examples_palette.dcm"))]),
        Case(
            "US, multi-frame colour",
            [decoded(pydicom_file("examples_ybr_color.dcm"), frame=7)],
            grayscale=False,
        ),
        Case("NM secondary capture, JPEG 2000", [decoded(pydicom_file("JPEG2000.dcm"))]),
        Case("multi-frame grayscale", [decoded(multiframe_grayscale(5), frame=3)]),
        Case("MR without Type 2 attributes", [decoded(part10(without_type_2(mr)))]),
    ]


def results_on(sources: Sequence[DicomSource]) -> Results:
    """Two boxes, on different images where there are several, two scores, and texts."""
    second = min(1, len(sources) - 1)
    return Results(
        task="ground",
        texts=(("Question", "Where is the nodule?"), ("Findings", "A nodule."), ("Impression", "Nodule.")),
        regions=(
            Region("Nodule", 0, (10.5, 12.0, 30.0, 40.0)),
            Region("left hilar fullness", second, (4, 5, 20, 25)),
        ),
        scores=(Score("Pleural effusion", 0.25), Score("fracture", 0.75)),
    )


def basic_report(sources: Sequence[DicomSource], results: Results) -> bytes:
    findings = [
        boxed_finding(sources[region.image_index], region.label, region.box_px) for region in results.regions
    ]
    content = [
        text_item(codes.DCM.Request, "Where is the nodule?"),
        container_item(codes.DCM.Findings, [text_item(codes.DCM.Finding, "A nodule."), *findings]),
    ]
    return structured_report(sources, AUTHOR, content, "ground")


def the_state(sources: Sequence[DicomSource], results: Results) -> bytes:
    boxes = [Annotation(region.label, region.box_px, region.image_index) for region in results.regions]
    return presentation_state(sources, AUTHOR, boxes)


def read_back(document: bytes, sources: Sequence[DicomSource], results: Results) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(document)))
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    assert sr.StudyInstanceUID == sources[0].study_instance_uid
    report = hd.sr.MeasurementReport.from_sequence([sr], copy=False)
    groups = report.get_planar_roi_measurement_groups()
    assert [group.tracking_identifier for group in groups] == ["finding 1", "finding 2"]
    uids = [group.tracking_uid for group in groups] + [
        group.tracking_uid for group in report.get_image_measurement_groups()
    ]
    assert len(set(uids)) == 4
    assert all(hd.UID(uid) for uid in uids)
    for group, region in zip(groups, results.regions, strict=True):
        assert labels(group) == [region.label]
        assert group.finding_type == finding_code(region.label)
        x_min, y_min, x_max, y_max = region.box_px
        assert group.roi is not None
        assert group.roi.value.tolist() == [
            [x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max], [x_min, y_min]
        ]  # fmt: skip
        image = sources[region.image_index]
        referenced = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == image.sop_instance_uid
        assert referenced.get("ReferencedFrameNumber") == (image.frame if image.frames > 1 else None)
    scored = report.get_image_measurement_groups()
    assert [labels(group) for group in scored] == [[score.label] for score in results.scores]
    assert [group.get_measurements()[0].value for group in scored] == [s.probability for s in results.scores]


def labels(group: Template) -> list[str]:
    root: Dataset = group[0]
    return [
        item.TextValue
        for item in root.ContentSequence
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Finding.value
    ]


def test_every_object_for_every_kind_of_source_passes_dciodvfy(tmp_path: Path) -> None:
    checked: dict[str, list[str]] = {}
    for case in cases():
        results = results_on(case.sources)
        report = measurement_report(case.sources, results, ALGORITHM, title="ground")
        read_back(report, case.sources, results)
        documents = {"TID 1500": report, "TID 2000": basic_report(case.sources, results)}
        if case.grayscale and len({s.study_instance_uid for s in case.sources}) == 1:
            documents["GSPS"] = the_state(case.sources, results)
        for kind, document in documents.items():
            checked[f"{case.name}: {kind}"] = dciodvfy_errors(document, tmp_path)
    print(f"dciodvfy checked {len(checked)} objects")
    assert {name: errors for name, errors in checked.items() if errors} == {}
    assert len(checked) == 9 * 2 + 7  # every report, and a state for each grayscale source of one study


def test_the_radiograph_built_here_is_itself_valid(tmp_path: Path) -> None:
    assert dciodvfy_errors(part10(knee_radiograph()), tmp_path) == []
