"""Every task answers in the hospital's standards, over HTTP: a TID 1500 Measurement Report by default for
application/dicom, the TID 2000 report by name, and a FHIR R4 bundle for application/fhir+json; each says
what the JSON answer says. dciodvfy checks every DICOM object, highdicom reads the reports back, and
fhir.resources (R4B) validates every bundle."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from pydicom.sr.codedict import codes

from app.main import create_app
from app.outputs.measurement_report import QUALITATIVE_EVALUATIONS
from tests.conftest import png_bytes, pydicom_file, settings_for
from tests.dicom_validator import dciodvfy_errors

# One reply for every task, in the syntax /ground is decoded under: a labelled box, a blank line, then an
# impression. The report reads findings and impression from it, /vqa answers it, /ground boxes the nodule.
REPLY = "Nodule <box>[[64, 64, 192, 128]]</box>\n\nNo acute abnormality."
MEASUREMENT_REPORT = "application/dicom"
BASIC_REPORT = "application/dicom; object=basic-report"
GSPS = "application/dicom; object=gsps"
FHIR = "application/fhir+json"
COMPREHENSIVE_3D_SR, COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"
LABELS = ["nodule", "normal"]
FIELDS: dict[str, dict[str, str]] = {
    "vqa": {"question": "Is there a nodule?"},
    "report": {"indication": "cough"},
    "ground": {"target": "nodule"},
    "classify": {"labels": json.dumps(LABELS), "question": "Which finding is shown?"},
}
SOURCES = ("CT_small.dcm", "MR_small.dcm")
ISSUER = "1.2.840.113619.6.197"

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)


@pytest.fixture(scope="module")
def client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(reply_checkpoint(REPLY)))) as client:
        yield client


@pytest.fixture(scope="module")
def checked() -> Iterator[list[str]]:
    """The DICOM objects dciodvfy found no error in, counted for the module (printed with -s)."""
    objects: list[str] = []
    yield objects
    print(f"\ndciodvfy: {len(objects)} DICOM objects, 0 errors")


def ask(client: TestClient, task: str, image: bytes, accept: str, **extra: str) -> Any:
    return client.post(
        f"/{task}",
        files={"image": ("image", image, "application/octet-stream")},
        data={**FIELDS[task], **extra},
        headers={"Accept": accept},
    )


def valid(document: bytes, folder: Path, checked: list[str], what: str) -> pydicom.Dataset:
    assert dciodvfy_errors(document, folder) == [], what
    checked.append(what)
    return pydicom.dcmread(io.BytesIO(document))


def texts_of(container: pydicom.Dataset) -> list[tuple[str, str]]:
    return [
        (item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue)
        for item in container.ContentSequence
        if item.ValueType == "TEXT"
    ]


def evaluations(root: pydicom.Dataset) -> list[tuple[str, str]]:
    found = [
        item
        for item in root.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS.value
    ]
    return texts_of(found[0]) if found else []


def expected_texts(task: str, answer: dict[str, Any]) -> list[tuple[str, str]]:
    """What the JSON answer says in words, under the concept each text is filed under."""
    if task == "vqa":
        return [("Request", FIELDS["vqa"]["question"]), ("Finding", answer["answer"])]
    if task == "report":
        return [
            ("Indications for Procedure", "cough"),
            ("Findings", answer["report"]["findings"]),
            ("Impression", answer["report"]["impression"]),
        ]
    if task == "classify":
        return [("Request", FIELDS["classify"]["question"])]
    return []


def regions_of(answer: dict[str, Any]) -> list[tuple[str, list[float]]]:
    return [
        (
            finding["label"],
            [finding["box_px"][key] for key in ("x_min", "y_min", "x_max", "y_max")],
        )
        for finding in answer.get("findings", [])
    ]


def scores_of(task: str, answer: dict[str, Any]) -> list[tuple[str, float]]:
    scored = answer["labels"] if task == "classify" else answer.get("choices") or []
    return [(item["label"], item["probability"]) for item in scored]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("task", ["vqa", "report", "ground", "classify"])
def test_the_measurement_report_says_what_the_json_says_and_every_dicom_answer_is_valid(
    client: TestClient, task: str, source: str, tmp_path: Path, checked: list[str]
) -> None:
    image = pydicom_file(source)
    answer = ask(client, task, image, "application/json").json()
    header = pydicom.dcmread(io.BytesIO(image), stop_before_pixels=True)

    response = ask(client, task, image, MEASUREMENT_REPORT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    dataset = valid(response.content, tmp_path, checked, f"TID 1500 /{task} {source}")
    assert dataset.SOPClassUID == COMPREHENSIVE_3D_SR
    assert (dataset.StudyInstanceUID, dataset.PatientID) == (header.StudyInstanceUID, header.PatientID)
    document = hd.sr.Comprehensive3DSR.from_dataset(dataset)
    report = hd.sr.MeasurementReport.from_sequence([document], copy=False)

    regions = report.get_planar_roi_measurement_groups()
    scores = report.get_image_measurement_groups()
    # One tracking id per finding, numbered in the order of the JSON answer: regions, then scores.
    tracking = [group.tracking_identifier for group in [*regions, *scores]]
    assert tracking == [f"finding {n}" for n in range(1, len(tracking) + 1)]
    assert len({group.tracking_uid for group in [*regions, *scores]}) == len(tracking)
    read_regions = []
    for group in regions:
        assert group.roi is not None
        referenced = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == header.SOPInstanceUID
        corners = group.roi.value.tolist()
        label = texts_of(group[0])[-1][1]
        read_regions.append((label, [*corners[0], *corners[2]]))
    expected_regions = regions_of(answer)
    assert [label for label, _ in read_regions] == [label for label, _ in expected_regions]
    for (_, box), (_, expected) in zip(read_regions, expected_regions, strict=True):
        assert box == pytest.approx(expected, abs=1e-3)
    read_scores = [
        (texts_of(group[0])[-1][1], group.get_measurements(name=codes.DCM.Probability)[0].value)
        for group in scores
    ]
    assert [label for label, _ in read_scores] == [label for label, _ in scores_of(task, answer)]
    assert [p for _, p in read_scores] == pytest.approx([p for _, p in scores_of(task, answer)], abs=1e-6)
    assert evaluations(dataset) == expected_texts(task, answer)
    if task == "ground":
        assert len(regions) == 1  # the reply's box, on the one image
        assert read_regions[0][0] == "Nodule"

    basic = ask(client, task, image, BASIC_REPORT)
    assert basic.status_code == 200, basic.text
    assert (
        valid(basic.content, tmp_path, checked, f"TID 2000 /{task} {source}").SOPClassUID == COMPREHENSIVE_SR
    )
    if task == "ground":
        state = ask(client, task, image, GSPS)
        assert state.status_code == 200, state.text
        assert valid(state.content, tmp_path, checked, f"GSPS /{task} {source}").Modality == "PR"


def resources(bundle: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [entry["resource"] for entry in bundle["entry"] if entry["resource"]["resourceType"] == kind]


def fhir_answer(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == FHIR
    bundle: dict[str, Any] = response.json()
    Bundle.model_validate(bundle)  # raises on anything R4B does not allow
    assert bundle["type"] == "collection"
    return bundle


def without(name: str, *keywords: str) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(pydicom_file(name)))
    for keyword in keywords:
        if keyword in dataset:
            delattr(dataset, keyword)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("task", ["vqa", "report", "ground", "classify"])
def test_the_fhir_bundle_validates_says_what_the_json_says_and_invents_no_patient_attribute(
    client: TestClient, task: str
) -> None:
    # The CT's header without the patient's sex and birth date: the Patient must not have them either.
    image = without("CT_small.dcm", "PatientSex", "PatientBirthDate")
    answer = ask(client, task, image, "application/json").json()
    bundle = fhir_answer(ask(client, task, image, FHIR))
    header = pydicom.dcmread(io.BytesIO(image), stop_before_pixels=True)

    (patient,) = resources(bundle, "Patient")
    assert patient["identifier"] == [{"value": header.PatientID}]
    assert set(patient) == {"resourceType", "identifier", "name"}  # no gender, no birthDate
    (study,) = resources(bundle, "ImagingStudy")
    assert study["identifier"][0]["value"] == f"urn:oid:{header.StudyInstanceUID}"
    (report,) = resources(bundle, "DiagnosticReport")
    assert report["status"] == "preliminary"
    observations = resources(bundle, "Observation")
    boxes = [observation for observation in observations if "component" in observation]
    scored = [observation for observation in observations if "valueQuantity" in observation]
    assert len(observations) == len(report.get("result", []))
    read_regions = [
        (
            observation["code"]["text"],
            [component["valueQuantity"]["value"] for component in observation["component"][:4]],
        )
        for observation in boxes
    ]
    expected_regions = regions_of(answer)
    assert [label for label, _ in read_regions] == [label for label, _ in expected_regions]
    for (_, box), (_, expected) in zip(read_regions, expected_regions, strict=True):
        assert box == pytest.approx(expected, abs=1e-3)
    for observation in boxes:
        uid = [c["valueString"] for c in observation["component"] if "valueString" in c]
        assert uid == [header.SOPInstanceUID]
    read_scores = [(o["code"]["text"], o["valueQuantity"]["value"]) for o in scored]
    assert [label for label, _ in read_scores] == [label for label, _ in scores_of(task, answer)]
    assert [p for _, p in read_scores] == pytest.approx([p for _, p in scores_of(task, answer)], abs=1e-6)
    conclusion = {
        "vqa": answer.get("answer"),
        "report": answer.get("report", {}).get("impression"),
    }.get(task)
    assert report.get("conclusion") == conclusion
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    for heading, value in expected_texts(task, answer):
        assert value in text, heading


def test_a_png_gets_a_patient_only_from_the_subject_fields_and_exactly_those_identifiers(
    client: TestClient,
) -> None:
    subject = {
        "patient_id": "MRN-0042",
        "patient_id_issuer": ISSUER,
        "accession_number": "ACC-7",
        "study_instance_uid": "1.2.826.0.1.3680043.10.511.9.1",
    }
    bundle = fhir_answer(ask(client, "ground", png_bytes(128, 128), FHIR, **subject))
    (patient,) = resources(bundle, "Patient")
    assert patient == {
        "resourceType": "Patient",
        "identifier": [{"system": f"urn:oid:{ISSUER}", "value": "MRN-0042"}],
    }
    (report,) = resources(bundle, "DiagnosticReport")
    assert [reference["identifier"]["value"] for reference in report["basedOn"]] == ["ACC-7"]
    assert [study["identifier"]["value"] for study in report["imagingStudy"]] == [
        "urn:oid:1.2.826.0.1.3680043.10.511.9.1"
    ]
    assert resources(bundle, "ImagingStudy") == []  # a study is named, not described: no header says more

    bare = fhir_answer(ask(client, "vqa", png_bytes(), FHIR))
    assert resources(bare, "Patient") == []
    (report,) = resources(bare, "DiagnosticReport")
    assert {"subject", "basedOn", "imagingStudy"}.isdisjoint(report)


def test_subject_fields_are_refused_beside_a_dicom_header_and_a_study_uid_must_be_a_uid(
    client: TestClient,
) -> None:
    ct = pydicom_file("CT_small.dcm")
    for accept in (FHIR, "application/json"):
        refused = ask(client, "vqa", ct, accept, patient_id="MRN-0042")
        assert refused.status_code == 422, refused.text
        assert "patient_id" in refused.json()["error"]["message"]
    for uid in ("1.2.abc", "1.02.3", "1." + "2" * 70):
        refused = ask(client, "vqa", png_bytes(), FHIR, study_instance_uid=uid)
        assert refused.status_code == 422, uid
    alone = ask(client, "vqa", png_bytes(), FHIR, patient_id_issuer=ISSUER)
    assert alone.status_code == 422
    # A picture is no DICOM source: a DICOM answer is not acceptable, a FHIR one is.
    assert ask(client, "vqa", png_bytes(), MEASUREMENT_REPORT).status_code == 406
    assert ask(client, "vqa", ct, "application/dicom; object=parametric-map").status_code == 406
