"""DICOM in (multipart, raw application/dicom, base64 JSON) and DICOM out (Structured Reports), over HTTP."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_files

from app.engine.build import generate_engine
from app.engine.protocol import Engine
from app.engine.runtime import ModelRuntime, Runtime
from app.logs import JsonFormatter
from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from tests.conftest import png_bytes, pydicom_file, settings_for
from tests.instrumented import InstrumentedRuntime

DATA_ROOT = Path(pydicom.data.__file__).parent / "test_files"
SHIPPED = sorted(
    str(Path(path).relative_to(DATA_ROOT))
    for path in get_testdata_files()
    if Path(path).is_file()
    and Path(path).suffix not in {".txt", ".json", ".dump", ".gz", ".icc"}
    and Path(path).name != "README"
)
DOCUMENTED_STATUSES = {200, 400, 413, 415, 422}


def post_dicom(
    client: TestClient, path: str, data: bytes, fields: dict[str, str] | None = None, **headers: str
) -> Any:
    return client.post(
        path, files={"image": ("file", data, "application/octet-stream")}, data=fields or {}, headers=headers
    )


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_file_gets_a_200_or_a_documented_4xx(random_client: TestClient, name: str) -> None:
    response = post_dicom(random_client, "/vqa", pydicom_file(name), {"question": "What is shown?"})
    assert response.status_code in DOCUMENTED_STATUSES, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"code", "message", "request_id"}


@pytest.mark.parametrize(
    ("name", "status", "modality"),
    [
        ("CT_small.dcm", 200, "CT"),
        ("MR_small_jpeg_ls_lossless.dcm", 200, "MR"),  # JPEG-LS
        ("MR_small_RLE.dcm", 200, "MR"),  # RLE
        ("693_J2KI.dcm", 200, "CT"),  # JPEG 2000
        ("JPGExtended.dcm", 200, "NM"),  # JPEG extended, 12 bit
        ("SC_rgb_jpeg_gdcm.dcm", 200, "OT"),  # JPEG lossless
        ("examples_ybr_color.dcm", 200, "US"),  # YBR, multi-frame
        ("examples_palette.dcm", 200, "US"),  # palette colour
        ("rtplan.dcm", 422, None),  # no image in it
        ("waveform_ecg.dcm", 422, None),
        ("test-SR.dcm", 422, None),
        ("dicomdirtests/77654033/CR1/6154", 422, None),  # MONOCHROME1, but 16x16: too small for the model
        ("MR_truncated.dcm", 400, None),
        ("JPEG2000-embedded-sequence-delimiter.dcm", 400, None),  # corrupt in a syntax decoded here
    ],
)
def test_known_files(random_client: TestClient, name: str, status: int, modality: str | None) -> None:
    response = post_dicom(random_client, "/report", pydicom_file(name))
    assert response.status_code == status, response.text
    if status == 200:
        dicom = response.json()["dicom"]
        assert dicom["modality"] == modality
        source = pydicom.dcmread(io.BytesIO(pydicom_file(name)), stop_before_pixels=True)
        assert dicom["sop_instance_uid"] == source.SOPInstanceUID
        assert dicom["study_instance_uid"] == source.StudyInstanceUID


def test_raw_application_dicom_with_fields_in_the_query(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa",
        params={"question": "Is there a mass?", "window": "soft_tissue"},
        content=pydicom_file("CT_small.dcm"),
        headers={"content-type": "application/dicom"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["dicom"]["window"] == {"center": 40.0, "width": 400.0, "source": "soft_tissue"}
    missing = random_client.post(
        "/vqa", content=pydicom_file("CT_small.dcm"), headers={"content-type": "application/dicom"}
    )
    assert missing.status_code == 422


def test_base64_dicom_in_json(random_client: TestClient) -> None:
    body = {"image": base64.b64encode(pydicom_file("MR_small.dcm")).decode(), "window": "100,500"}
    response = random_client.post("/ground", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["dicom"]["window"] == {"center": 100.0, "width": 500.0, "source": "request"}


def test_frame_and_window_fields(random_client: TestClient) -> None:
    ybr = pydicom_file("examples_ybr_color.dcm")
    first = post_dicom(random_client, "/vqa", ybr, {"question": "q", "frame": "1"})
    assert first.json()["dicom"]["frame"] == 1
    assert first.json()["dicom"]["frames"] == 30
    assert post_dicom(random_client, "/vqa", ybr, {"question": "q", "frame": "31"}).status_code == 422
    assert post_dicom(random_client, "/vqa", ybr, {"question": "q", "window": "lung"}).status_code == 422
    ct = pydicom_file("CT_small.dcm")
    assert post_dicom(random_client, "/vqa", ct, {"question": "q", "window": "brightest"}).status_code == 422
    assert (
        post_dicom(random_client, "/vqa", png_bytes(), {"question": "q", "window": "lung"}).status_code == 422
    )


# --- DICOM out ---

GROUND_REPLY = "Nodule: [64, 64, 192, 128]"
# Today's default for application/dicom is the TID 1500 Measurement Report (tests/api/test_standards.py);
# the TID 2000 report the service wrote first is asked for by name.
BASIC_REPORT = "application/dicom; object=basic-report"


@pytest.fixture(scope="module")
def reply_client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(reply_checkpoint(GROUND_REPLY)))) as client:
        yield client


def structured_report(response: Any) -> tuple[pydicom.Dataset, hd.sr.ComprehensiveSR]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    dataset = pydicom.dcmread(io.BytesIO(response.content))
    report = hd.sr.srread(io.BytesIO(response.content))
    assert isinstance(report, hd.sr.ComprehensiveSR)
    return dataset, report


def items_named(container: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    return [
        item for item in container.ContentSequence if item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def check_filed_beside_the_source(report: pydicom.Dataset, source_name: str) -> pydicom.Dataset:
    source = pydicom.dcmread(io.BytesIO(pydicom_file(source_name)), stop_before_pixels=True)
    assert report.Modality == "SR"
    assert report.PatientID == source.PatientID
    assert report.PatientName == source.PatientName
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID
    assert report.VerificationFlag == "UNVERIFIED"
    evidence = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    observer_type = items_named(report, "Observer Type")[0]
    assert observer_type.ConceptCodeSequence[0].CodeMeaning == "Device"
    return source


def test_grounding_as_a_structured_report_with_boxes_on_the_source_pixels(reply_client: TestClient) -> None:
    # The reply is in one of MedMO's other syntaxes, which the grammar of a constrained reply leaves out.
    response = post_dicom(
        reply_client,
        "/ground",
        pydicom_file("CT_small.dcm"),
        {"constrained": "false"},
        Accept=BASIC_REPORT,
    )
    report, _ = structured_report(response)
    source = check_filed_beside_the_source(report, "CT_small.dcm")
    (finding,) = items_named(items_named(report, "Findings")[0], "Finding")
    assert finding.TextValue == "Nodule"
    region = finding.ContentSequence[0]
    assert (region.ValueType, region.GraphicType, region.RelationshipType) == (
        "SCOORD",
        "POLYLINE",
        "INFERRED FROM",
    )
    # The 128x128 CT is seen by the model at 256x256: [64, 64, 192, 128] is x 32..96, y 32..64 of the source.
    assert list(region.GraphicData) == pytest.approx([32, 32, 96, 32, 96, 64, 32, 64, 32, 32])
    image = region.ContentSequence[0]
    assert image.RelationshipType == "SELECTED FROM"
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_report_and_vqa_as_structured_reports(reply_client: TestClient) -> None:
    data = pydicom_file("MR_small.dcm")
    report, _ = structured_report(
        post_dicom(reply_client, "/report", data, {"indication": "headache"}, Accept=BASIC_REPORT)
    )
    check_filed_beside_the_source(report, "MR_small.dcm")
    assert items_named(report, "Indications for Procedure")[0].TextValue == "headache"
    assert items_named(items_named(report, "Findings")[0], "Finding")[0].TextValue == GROUND_REPLY
    vqa, _ = structured_report(
        post_dicom(
            reply_client, "/vqa", data, {"question": "Any lesion?"}, Accept=f"{BASIC_REPORT}, */*;q=0.5"
        )
    )
    assert items_named(vqa, "Request")[0].TextValue == "Any lesion?"
    assert items_named(items_named(vqa, "Findings")[0], "Finding")[0].TextValue == GROUND_REPLY


def test_raw_dicom_in_and_structured_report_out_as_a_pacs_calls_it(reply_client: TestClient) -> None:
    response = reply_client.post(
        "/report",
        content=pydicom_file("CT_small.dcm"),
        headers={"content-type": "application/dicom", "accept": BASIC_REPORT},
    )
    report, _ = structured_report(response)
    check_filed_beside_the_source(report, "CT_small.dcm")
    # What a PACS gets by default: the TID 1500 Measurement Report, filed the same way.
    default = reply_client.post(
        "/report",
        content=pydicom_file("CT_small.dcm"),
        headers={"content-type": "application/dicom", "accept": "application/dicom"},
    )
    assert default.status_code == 200, default.text
    measurements = pydicom.dcmread(io.BytesIO(default.content))
    assert measurements.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert measurements.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    check_filed_beside_the_source(measurements, "CT_small.dcm")


def test_content_negotiation(reply_client: TestClient) -> None:
    png = post_dicom(reply_client, "/vqa", png_bytes(), {"question": "q"}, Accept="application/dicom")
    assert png.status_code == 406  # a Structured Report needs a DICOM source
    assert (
        post_dicom(reply_client, "/vqa", png_bytes(), {"question": "q"}, Accept="image/png").status_code
        == 406
    )
    for unknown in ("application/dicom; object=segmentation", "application/fhir+xml"):
        refused = post_dicom(
            reply_client, "/vqa", pydicom_file("CT_small.dcm"), {"question": "q"}, Accept=unknown
        )
        assert refused.status_code == 406, unknown
    json_first = post_dicom(
        reply_client,
        "/vqa",
        pydicom_file("CT_small.dcm"),
        {"question": "q"},
        Accept="application/json, application/dicom;q=0.9",
    )
    assert json_first.headers["content-type"] == "application/json"


# --- patient data ---

CANARY_NAME = "Canarywoman^Planted^Quill"
CANARY_ID = "PID-CANARY-80471"


def planted_ct() -> bytes:
    source = pydicom.dcmread(io.BytesIO(pydicom_file("CT_small.dcm")))
    source.PatientName = CANARY_NAME
    source.PatientID = CANARY_ID
    source.PatientBirthDate = "19470101"
    buffer = io.BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_planted_patient_data_reaches_no_json_response_and_no_log_line(
    reply_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    data = planted_ct()
    caplog.set_level(logging.DEBUG)
    responses = [
        post_dicom(reply_client, path, data, fields)
        for path, fields in [
            ("/vqa", {"question": "q"}),
            ("/report", {}),
            ("/ground", {}),
            ("/vqa", {"question": "q", "frame": "9"}),
        ]
    ]
    responses.append(
        reply_client.post("/report", content=data, headers={"content-type": "application/dicom"})
    )
    responses.append(
        reply_client.post("/report", json={"image": base64.b64encode(data).decode(), "window": "x"})
    )
    assert [r.status_code for r in responses] == [200, 200, 200, 422, 200, 422]
    report = post_dicom(reply_client, "/report", data, Accept="application/dicom")
    assert pydicom.dcmread(io.BytesIO(report.content)).PatientID == CANARY_ID  # the report must carry it
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(record) for record in caplog.records)
    assert "medmo.access" in logged  # the requests were logged
    for canary in (CANARY_NAME, "Canarywoman", CANARY_ID, "19470101"):
        assert canary not in logged
        for response in responses:
            assert canary not in response.text


def test_a_report_that_cannot_be_anchored_is_refused_before_the_model_runs(random_checkpoint: Path) -> None:
    model_runtime = ModelRuntime.load(Settings(model=str(random_checkpoint)))
    instruments = InstrumentedRuntime(model_runtime)
    settings = settings_for(random_checkpoint, engine="generate", report_max_new_tokens=2)

    def engine(settings: Settings, runtime: Runtime, metrics: Metrics) -> Engine:
        return generate_engine(settings, instruments, metrics)

    with TestClient(create_app(settings, runtime=model_runtime, engine_factory=engine)) as client:
        anchored = post_dicom(client, "/report", pydicom_file("CT_small.dcm"), Accept="application/dicom")
        assert anchored.status_code == 200, anchored.text
        assert instruments.computed == 1  # the count sees the model's work
        for name, missing in [
            ("SC_rgb_jls_lossy_line.dcm", "no Study Instance UID"),
            ("GDCMJ2K_TextGBR.dcm", "no patient module"),
        ]:
            refused = post_dicom(client, "/report", pydicom_file(name), Accept="application/dicom")
            assert refused.status_code == 422, refused.text
            assert refused.json()["error"]["code"] == "incomplete_report_source"
            assert missing in refused.json()["error"]["message"]
        assert instruments.computed == 1  # no inference was spent on them
        as_json = post_dicom(client, "/report", pydicom_file("SC_rgb_jls_lossy_line.dcm"))
        assert as_json.status_code == 200  # the same source answers in JSON, which needs no anchor
        assert instruments.computed == 2
