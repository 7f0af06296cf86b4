"""What a Structured Report needs from its source, checked before the model runs, and what is filled."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files

from app.imaging import DicomSource, ImageError, ImageLimits, decode_image
from app.outputs.dicom_sr import Author, ReportSourceError, check_report_source, structured_report
from app.tasks.ground import GROUND, Box, Grounded, GroundedFinding, GroundFields
from app.tasks.report import REPORT, Report, ReportFields
from app.tasks.vqa import VQA, VqaFields
from tests.conftest import pydicom_file
from tests.corpus import MIB, part10, synthetic_ct
from tests.dicom_validator import dciodvfy_errors

# highdicom warns about single-component person names, which most anonymised test files have.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)

LIMITS = ImageLimits(max_bytes=64 * MIB, max_pixels=50_000_000)
AUTHOR = Author(model="tiny", revision=None)
DATA_ROOT = Path(pydicom.data.__file__).parent / "test_files"


def has_a_usable_image(path: str) -> bool:
    """Pixel data with both sides at least 32: read without the pixels, so that collecting is quick."""
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rows, columns = header.get("Rows"), header.get("Columns")
    return isinstance(rows, int) and isinstance(columns, int) and min(rows, columns) >= 32


IMAGES = [
    str(Path(path).relative_to(DATA_ROOT)) for path in get_testdata_files("*.dcm") if has_a_usable_image(path)
]


def source_of(data: bytes) -> DicomSource:
    decoded = decode_image(data, LIMITS)
    assert decoded.dicom is not None
    return decoded.dicom


def every_report(source: DicomSource) -> list[bytes]:
    box = Box(x_min=1, y_min=1, x_max=9, y_max=9)
    finding = GroundedFinding(
        label="Nodule",
        image_index=0,
        sop_instance_uid=source.sop_instance_uid,
        frame=source.frame,
        box=Box(x_min=0.1, y_min=0.1, x_max=0.2, y_max=0.2),
        box_px=box,
    )
    report = Report(findings="Clear.", impression="Normal.", text="t")
    contents = [
        (VQA, VQA.report_content(VqaFields(question="Any mass?"), "No.", [source])),
        (REPORT, REPORT.report_content(ReportFields(indication="cough"), report, [source])),
        (GROUND, GROUND.report_content(GroundFields(), Grounded([finding]), [source])),
    ]
    return [structured_report([source], AUTHOR, content, task.report_title) for task, content in contents]


@pytest.mark.parametrize("name", IMAGES)
def test_a_source_that_passes_the_check_gets_every_report(name: str) -> None:
    try:
        source = source_of(pydicom_file(name))
    except ImageError:
        return  # not an image this service decodes: there is nothing to report on
    try:
        check_report_source(source)
    except ReportSourceError:
        assert name in REFUSED
        return
    assert name not in REFUSED
    for document in every_report(source):
        assert pydicom.dcmread(io.BytesIO(document)).StudyInstanceUID == source.study_instance_uid


REFUSED = {
    "GDCMJ2K_TextGBR.dcm": "no patient module",
    "SC_rgb_jls_lossy_line.dcm": "no Study Instance UID",
    "SC_rgb_jls_lossy_sample.dcm": "no Study Instance UID",
}


@pytest.mark.parametrize(("name", "missing"), REFUSED.items())
def test_what_is_missing_is_named(name: str, missing: str) -> None:
    with pytest.raises(ReportSourceError, match=missing):
        check_report_source(source_of(pydicom_file(name)))


def test_a_missing_patient_id_is_filled_empty_and_the_name_is_kept() -> None:
    source = source_of(pydicom_file("ExplVR_BigEnd.dcm"))  # a Patient's Name, no Patient ID
    assert "PatientID" not in source.header
    check_report_source(source)
    report = pydicom.dcmread(io.BytesIO(every_report(source)[0]))
    assert report.PatientID == ""
    assert report.PatientName == source.header.PatientName
    assert report.StudyInstanceUID == source.header.StudyInstanceUID


def test_values_dicom_does_not_allow_are_written_empty_never_guessed() -> None:
    dataset = synthetic_ct()
    dataset.PatientSex, dataset.PatientBirthDate, dataset.StudyTime = "X", "1947-01-01", "noon"
    source = source_of(part10(dataset))
    check_report_source(source)
    report = pydicom.dcmread(io.BytesIO(every_report(source)[1]))
    assert (report.PatientSex, report.PatientBirthDate, report.StudyTime) == ("", "", "")
    assert (report.PatientID, report.StudyDate) == ("CORPUS-1", "20240101")  # valid values are copied
    assert source.header.PatientSex == "X"  # the source itself is left as it came


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        (("StudyInstanceUID",), "no Study Instance UID"),
        (("SeriesInstanceUID",), "no Series Instance UID"),
        (("PatientID", "PatientName", "PatientBirthDate", "PatientSex"), "no patient module"),
    ],
)
def test_missing_anchors_are_refused(remove: tuple[str, ...], missing: str) -> None:
    dataset = synthetic_ct()
    for keyword in remove:
        delattr(dataset, keyword)
    with pytest.raises(ReportSourceError, match=missing):
        check_report_source(source_of(part10(dataset)))


def test_a_sop_class_that_is_not_a_storage_class_is_refused() -> None:
    dataset = synthetic_ct()
    dataset.SOPClassUID = "1.2.826.0.1.3680043.8.498.77"  # a private class nobody can look up
    with pytest.raises(ReportSourceError, match="not a standard storage class"):
        check_report_source(source_of(part10(dataset)))


def test_a_header_highdicom_would_refuse_is_found_by_a_trial_report_without_quoting_it() -> None:
    dataset = synthetic_ct()
    dataset.SpecificCharacterSet = "NOT-A-CHARSET-CANARY"
    with pytest.raises(ReportSourceError, match="holds a value DICOM does not allow") as refused:
        check_report_source(source_of(part10(dataset)))
    assert "CANARY" not in str(refused.value)


def test_an_empty_first_character_set_means_iso_2022_ir_6() -> None:
    dataset = synthetic_ct()
    dataset.SpecificCharacterSet = ["", "ISO 2022 IR 87"]  # how Japanese files often say it
    dataset.PatientName = "Yamada^Tarou=山田^太郎"
    source = source_of(part10(dataset))
    check_report_source(source)
    report = pydicom.dcmread(io.BytesIO(every_report(source)[0]))
    assert report.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert str(report.PatientName) == "Yamada^Tarou=山田^太郎"


def test_a_grounding_report_without_findings_is_valid_dicom(tmp_path: Path) -> None:
    source = source_of(pydicom_file("CT_small.dcm"))
    content = GROUND.report_content(GroundFields(), Grounded([]), [source])
    document = structured_report([source], AUTHOR, content, GROUND.report_title)
    assert dciodvfy_errors(document, tmp_path) == []
