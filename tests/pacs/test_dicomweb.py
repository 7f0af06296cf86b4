"""Tasks on images in the PACS, by UID: MedMO Serve fetches them from a real Orthanc over DICOMweb
(WADO-RS, Orthanc's DICOMweb plugin, behind a login) and stores the answers back (STOW-RS); for a series, it
lists the instances and finds the prior first (QIDO-RS).

The PACS failing is tested for real too: a port nothing listens on (unreachable), a small server that
trickles its answer (slow), the real Orthanc with a wrong password or an instance above the size limit.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from bench.servers import RunningServer, free_port, serve
from tests.pacs.fhir import fhir_server
from tests.pacs.orthanc import RunningOrthanc, orthanc
from tests.pacs.studies import PATIENT_ID, PATIENT_NAME, Examination, cr_study, ct_series

# What the tiny checkpoint answers to every prompt: a report (findings, a blank line, the impression) and
# one box.
# In the syntax /ground is decoded under (MedMO's boxes), with an impression after a blank line.
REPLY = "Nodule <box>[[64, 64, 192, 128]]</box>\n\nNormal study."
KEY = "dicomweb-test-key-000000001"
PACS_USER, PACS_PASSWORD = "medmo", "pacs-password-for-tests-1"
# What store: ["sr"] files: the TID 1500 Measurement Report, a Comprehensive 3D SR.
COMPREHENSIVE_3D_SR, GSPS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.11.1"


@pytest.fixture(scope="module")
def examinations() -> tuple[Examination, Examination]:
    return ct_series(5), cr_study(("PA",))


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, examinations: tuple[Examination, Examination]
) -> Iterator[RunningOrthanc]:
    """Orthanc as the PACS, its REST API and DICOMweb behind a login, routing nothing by itself."""
    folder = tmp_path_factory.mktemp("pacs")
    with orthanc(
        folder, {"Url": "http://127.0.0.1:9", "Modalities": {}}, dicomweb_users={PACS_USER: PACS_PASSWORD}
    ) as running:
        for examination in examinations:
            for data in examination.files:
                running.store(data)
        yield running


@dataclass(frozen=True)
class SeriesStudies:
    """Studies of the same patient for the series routes: a 40-slice CT, and radiographs (PA and lateral)
    with a prior. The examinations' CR (2025-03-12) is an older prior of `current` too, so the latest must
    be chosen."""

    ct: Examination
    current: Examination
    prior: Examination


@pytest.fixture(scope="module")
def series_studies(pacs: RunningOrthanc) -> SeriesStudies:
    studies = SeriesStudies(
        ct=ct_series(40),
        current=cr_study(("PA", "LL"), study_date="20250610"),
        prior=cr_study(("PA", "LL"), study_date="20250402"),
    )
    for examination in (studies.ct, studies.prior, studies.current):
        for data in examination.files:
            pacs.store(data)
    return studies


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "pacs-login"
    path.write_text(f"# the PACS's DICOMweb login\n{PACS_USER}:{PACS_PASSWORD}\n")
    return path


@pytest.fixture(scope="module")
def medmo(
    pacs: RunningOrthanc,
    credentials: Path,
    reply_checkpoint: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunningServer]:
    env = {
        "MEDMO_API_KEYS": KEY,
        "MEDMO_LOG_LEVEL": "debug",
        "MEDMO_DICOMWEB_URL": f"{pacs.url}/dicom-web/",
        "MEDMO_DICOMWEB_CREDENTIALS_FILE": str(credentials),
    }
    with serve(reply_checkpoint(REPLY), tmp_path_factory.mktemp("medmo") / "medmo.log", env=env) as server:
        yield server


def path(dataset: pydicom.Dataset, task: str) -> str:
    return (
        f"/dicomweb/studies/{dataset.StudyInstanceUID}/series/{dataset.SeriesInstanceUID}"
        f"/instances/{dataset.SOPInstanceUID}/{task}"
    )


def series_path(examination: Examination, task: str) -> str:
    return f"/dicomweb/studies/{examination.study_uid}/series/{examination.series_uid}/{task}"


def post(server_url: str, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{server_url}{route}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    )


def test_an_image_pulled_by_its_uids_gets_the_tasks_json_with_its_dicom_block(
    medmo: RunningServer, examinations: tuple[Examination, Examination]
) -> None:
    ct, _ = examinations
    slice_ = ct.datasets[2]
    answer = post(medmo.url, path(slice_, "report"), {"indication": "cough", "window": "lung"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["task"] == "report"
    assert body["report"]["impression"] == "Normal study."
    assert body["dicom"]["sop_instance_uid"] == slice_.SOPInstanceUID
    assert body["dicom"]["series_instance_uid"] == slice_.SeriesInstanceUID
    assert body["dicom"]["modality"] == "CT"
    assert body["dicom"]["window"]["source"] == "lung"
    assert body["image"] == {"width": 64, "height": 64}
    assert body["stored"] == []

    question = post(medmo.url, path(slice_, "vqa"), {"question": "Any nodule?"})
    assert question.status_code == 200, question.text
    assert question.json()["answer"] == REPLY


def test_with_store_on_the_sr_and_the_presentation_state_are_filed_in_the_study(
    medmo: RunningServer, pacs: RunningOrthanc, examinations: tuple[Examination, Examination]
) -> None:
    _, cr = examinations
    image = cr.datasets[0]
    answer = post(medmo.url, path(image, "ground"), {"target": "nodule", "store": ["sr", "gsps"]})
    assert answer.status_code == 200, answer.text
    stored = answer.json()["stored"]
    assert [item["object"] for item in stored] == ["sr", "gsps"]
    assert [item["sop_class_uid"] for item in stored] == [COMPREHENSIVE_3D_SR, GSPS]
    assert answer.json()["fhir"] is None  # no FHIR server configured

    # Orthanc's REST API finds both in the image's study, as the response says.
    found = httpx.post(
        f"{pacs.url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": image.StudyInstanceUID}, "Expand": True},
        auth=(PACS_USER, PACS_PASSWORD),
        timeout=30,
    ).json()
    filed = {instance["MainDicomTags"]["SOPInstanceUID"]: instance for instance in found}
    for item in stored:
        assert item["study_instance_uid"] == image.StudyInstanceUID
        assert item["sop_instance_uid"] in filed
        assert item["retrieve_url"].startswith(f"{pacs.url}/dicom-web/studies/{image.StudyInstanceUID}/")
        assert item["retrieve_url"].endswith(item["sop_instance_uid"])
        dataset = pydicom.dcmread(io.BytesIO(pacs.instance_file(filed[item["sop_instance_uid"]]["ID"])))
        assert dataset.SeriesInstanceUID == item["series_instance_uid"]
        assert dataset.PatientID == PATIENT_ID
    state = pydicom.dcmread(io.BytesIO(pacs.instance_file(filed[stored[1]["sop_instance_uid"]]["ID"])))
    assert (
        state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == image.SOPInstanceUID
    )


def test_an_unknown_uid_is_a_404_and_a_malformed_one_a_422_in_the_error_shape(
    medmo: RunningServer, examinations: tuple[Examination, Examination]
) -> None:
    ct, _ = examinations
    known = ct.datasets[0]
    unknown = f"/dicomweb/studies/{known.StudyInstanceUID}/series/{known.SeriesInstanceUID}/instances/1.2.3.4/report"
    answer = post(medmo.url, unknown, {})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert set(answer.json()["error"]) == {"code", "message", "request_id"}
    for malformed in ("1.2.abc", "1.02.3", "1." + "2" * 70, "1..2"):
        route = f"/dicomweb/studies/{malformed}/series/{known.SeriesInstanceUID}/instances/{known.SOPInstanceUID}/report"
        refused = post(medmo.url, route, {})
        assert refused.status_code == 422, malformed
        assert refused.json()["error"]["code"] == "invalid_request"
    # The body is checked as strictly as on the task routes.
    assert post(medmo.url, path(known, "report"), {"store": ["gsps"]}).status_code == 422
    assert post(medmo.url, path(known, "vqa"), {}).status_code == 422
    assert post(medmo.url, path(known, "report"), {"stream": True}).status_code == 422


def filed_report(pacs: RunningOrthanc, study: str, stored: dict[str, Any]) -> pydicom.Dataset:
    """The Structured Report the service says it stored, as Orthanc's REST API finds it in the study."""
    found = httpx.post(
        f"{pacs.url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study}, "Expand": True},
        auth=(PACS_USER, PACS_PASSWORD),
        timeout=30,
    ).json()
    (instance,) = [i for i in found if i["MainDicomTags"]["SOPInstanceUID"] == stored["sop_instance_uid"]]
    return pydicom.dcmread(io.BytesIO(pacs.instance_file(instance["ID"])))


def referenced(evidence: Any) -> list[str]:
    """The SOP Instance UIDs an SR's evidence sequence references (current or other), in its order."""
    return [
        str(instance.ReferencedSOPInstanceUID)
        for study in evidence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    ]


def test_a_series_pulled_by_its_uids_is_one_request_on_evenly_spaced_slices_in_anatomical_order(
    medmo: RunningServer, pacs: RunningOrthanc, series_studies: SeriesStudies
) -> None:
    ct = series_studies.ct
    answer = post(medmo.url, series_path(ct, "report"), {"instances": 5, "store": ["sr"]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # Slices evenly spaced by position (Instance Number counts from the top: it would choose others).
    stack = sorted(ct.datasets, key=lambda dataset: float(dataset.ImagePositionPatient[2]))
    chosen = [stack[index] for index in (4, 12, 20, 28, 36)]
    assert [image["dicom"]["sop_instance_uid"] for image in body["images"]] == [
        dataset.SOPInstanceUID for dataset in chosen
    ]
    # Sent from the lowest to the highest, and shown so.
    height = {dataset.SOPInstanceUID: float(dataset.ImagePositionPatient[2]) for dataset in ct.datasets}
    shown = sorted(body["images"], key=lambda image: image["shown_as"])
    heights = [height[image["dicom"]["sop_instance_uid"]] for image in shown]
    assert heights == sorted(set(heights))
    assert [image["shown_as"] for image in body["images"]] == [1, 2, 3, 4, 5]
    assert [image["caption"] for image in body["images"]] == [
        f"slice {index + 1} of 40" for index in (4, 12, 20, 28, 36)
    ]
    assert body["prior_study_instance_uid"] is None

    (stored,) = body["stored"]
    assert stored["object"] == "sr"
    assert stored["study_instance_uid"] == ct.study_uid
    report = filed_report(pacs, ct.study_uid, stored)
    assert report.StudyInstanceUID == ct.study_uid
    assert sorted(referenced(report.CurrentRequestedProcedureEvidenceSequence)) == sorted(
        dataset.SOPInstanceUID for dataset in chosen
    )
    assert "PertinentOtherEvidenceSequence" not in report


def test_with_prior_the_latest_earlier_study_is_pulled_too_captioned_and_referenced_as_other_evidence(
    medmo: RunningServer,
    pacs: RunningOrthanc,
    series_studies: SeriesStudies,
    examinations: tuple[Examination, Examination],
) -> None:
    current, prior = series_studies.current, series_studies.prior
    answer = post(medmo.url, series_path(current, "report"), {"prior": True, "store": ["sr"]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # Of the two earlier radiograph studies (2025-03-12, 2025-04-02), the later; every view of each.
    assert body["prior_study_instance_uid"] == prior.study_uid
    assert [image["dicom"]["sop_instance_uid"] for image in body["images"]] == [
        dataset.SOPInstanceUID for dataset in (*current.datasets, *prior.datasets)
    ]
    assert [image["caption"] for image in body["images"]] == [
        "current, 2025-06-10, PA",
        "current, 2025-06-10, LL",
        "prior, 2025-04-02, PA",
        "prior, 2025-04-02, LL",
    ]
    assert [image["shown_as"] for image in body["images"]] == [1, 2, 3, 4]

    (stored,) = body["stored"]
    report = filed_report(pacs, current.study_uid, stored)
    assert report.StudyInstanceUID == current.study_uid
    assert referenced(report.CurrentRequestedProcedureEvidenceSequence) == [
        dataset.SOPInstanceUID for dataset in current.datasets
    ]
    assert sorted(referenced(report.PertinentOtherEvidenceSequence)) == sorted(
        dataset.SOPInstanceUID for dataset in prior.datasets
    )

    # The examinations' radiograph is the patient's first: asked for a prior, it runs alone, uncaptioned
    # by date.
    _, first = examinations
    alone = post(medmo.url, series_path(first, "vqa"), {"question": "Any change?", "prior": True})
    assert alone.status_code == 200, alone.text
    assert alone.json()["prior_study_instance_uid"] is None
    assert [image["caption"] for image in alone.json()["images"]] == ["PA"]


def test_all_is_at_most_the_images_a_request_holds_and_more_are_refused_as_documented(
    medmo: RunningServer, series_studies: SeriesStudies
) -> None:
    ct = series_studies.ct
    # MEDMO_MAX_IMAGES is 8: all of forty slices is eight of them, evenly spaced.
    every = post(medmo.url, series_path(ct, "vqa"), {"question": "Any nodule?", "instances": "all"})
    assert every.status_code == 200, every.text
    assert [image["caption"] for image in every.json()["images"]] == [
        f"slice {index + 1} of 40" for index in (2, 7, 12, 17, 22, 27, 32, 37)
    ]

    def refused(route: str, body: dict[str, Any]) -> tuple[int, str]:
        answer = post(medmo.url, route, body)
        assert set(answer.json()["error"]) == {"code", "message", "request_id"}
        return answer.status_code, answer.json()["error"]["code"]

    unknown = f"/dicomweb/studies/{ct.study_uid}/series/1.2.3.4/report"
    assert refused(unknown, {}) == (404, "not_found")
    assert refused(f"/dicomweb/studies/{ct.study_uid}/series/1.02.3/report", {}) == (422, "invalid_request")
    assert refused(series_path(ct, "report"), {"instances": 9}) == (413, "too_many_images")
    for body in ({"instances": 0}, {"instances": "5"}, {"instances": "every"}, {"stream": True}):
        assert refused(series_path(ct, "report"), body) == (422, "invalid_request"), body
    # /ground takes no prior: a presentation state cannot span a study and its prior.
    assert refused(series_path(ct, "ground"), {"target": "nodule", "prior": True}) == (422, "invalid_request")


def test_the_service_log_holds_no_patient_data_and_no_uid(
    medmo: RunningServer, examinations: tuple[Examination, Examination], series_studies: SeriesStudies
) -> None:
    ct, cr = examinations
    # After the calls above (and one more failing at the PACS): the debug log of all of them, series and
    # prior searches included.
    post(medmo.url, path(ct.datasets[1], "ground"), {"store": ["sr"]})
    log = medmo.log()
    assert '"path": "/dicomweb/studies/{study_instance_uid}' in log
    assert '"path": "/dicomweb/studies/{study_instance_uid}/series/{series_instance_uid}/report"' in log
    for value in (PATIENT_NAME, PATIENT_ID, str(ct.datasets[0].AccessionNumber), PACS_PASSWORD):
        assert value not in log
    for examination in (ct, cr, series_studies.ct, series_studies.current, series_studies.prior):
        for dataset in examination.datasets:
            assert dataset.SOPInstanceUID not in log
        assert examination.study_uid not in log
        assert examination.series_uid not in log


# --- the PACS failing: in-process apps sharing one loaded model, each configured for its PACS ---


@pytest.fixture(scope="module")
def runtime(random_client: TestClient) -> Any:
    return random_client.app.state.service.runtime  # type: ignore[attr-defined]


def pull(runtime: Any, dataset: pydicom.Dataset, **settings: Any) -> tuple[httpx.Response, float]:
    app = create_app(Settings(model="unused", **settings), runtime=runtime)
    with TestClient(app) as client:
        began = time.monotonic()
        answer = client.post(path(dataset, "report"), json={})
        return answer, time.monotonic() - began


def test_without_a_configured_pacs_the_routes_answer_503(
    runtime: Any, examinations: tuple[Examination, Examination]
) -> None:
    answer, _ = pull(runtime, examinations[0].datasets[0])
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "dicomweb_not_configured"
    with TestClient(create_app(Settings(model="unused"), runtime=runtime)) as client:
        series = client.post(series_path(examinations[0], "report"), json={"prior": True})
    assert series.status_code == 503
    assert series.json()["error"]["code"] == "dicomweb_not_configured"


def test_an_unreachable_pacs_is_a_502_after_its_retries(
    runtime: Any, examinations: tuple[Examination, Examination]
) -> None:
    answer, took = pull(
        runtime,
        examinations[0].datasets[0],
        dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web",
        dicomweb_retries=2,
    )
    assert answer.status_code == 502
    assert answer.json()["error"] == {
        **answer.json()["error"],
        "code": "pacs_error",
        "message": "the PACS could not be reached",
    }
    assert took >= 0.25 + 0.5  # two more tries, after 0.25 s and 0.5 s


def test_a_pacs_refusing_the_login_is_a_502(
    runtime: Any, pacs: RunningOrthanc, tmp_path: Path, examinations: tuple[Examination, Examination]
) -> None:
    wrong = tmp_path / "login"
    wrong.write_text(f"{PACS_USER}:not-the-password\n")
    answer, _ = pull(
        runtime,
        examinations[0].datasets[0],
        dicomweb_url=f"{pacs.url}/dicom-web",
        dicomweb_credentials_file=wrong,
    )
    assert answer.status_code == 502
    assert "credentials" in answer.json()["error"]["message"]


def test_an_instance_above_the_size_limit_is_a_413(
    runtime: Any, pacs: RunningOrthanc, credentials: Path, examinations: tuple[Examination, Examination]
) -> None:
    # A 64x64 16-bit slice is over 8 KiB; the limit is 4 KiB.
    answer, _ = pull(
        runtime,
        examinations[0].datasets[0],
        dicomweb_url=f"{pacs.url}/dicom-web",
        dicomweb_credentials_file=credentials,
        max_upload_bytes=4096,
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "image_too_large"


def test_instances_above_the_size_limit_together_are_a_413_though_each_is_below_it(
    runtime: Any, pacs: RunningOrthanc, credentials: Path, series_studies: SeriesStudies
) -> None:
    # Each 64x64 16-bit slice is a little over 8 KiB: five of them are over the 20 000 bytes allowed.
    app = create_app(
        Settings(
            model="unused",
            dicomweb_url=f"{pacs.url}/dicom-web",
            dicomweb_credentials_file=credentials,
            max_upload_bytes=20_000,
        ),
        runtime=runtime,
    )
    with TestClient(app) as client:
        one = client.post(series_path(series_studies.ct, "report"), json={"instances": 1})
        five = client.post(series_path(series_studies.ct, "report"), json={"instances": 5})
    assert one.status_code == 200, one.text
    assert five.status_code == 413
    assert five.json()["error"]["code"] == "image_too_large"
    assert "together" in five.json()["error"]["message"]


class Trickle(BaseHTTPRequestHandler):
    """A PACS that answers at once, then sends its instance a byte every 0.3 s: never silent long enough
    for a read timeout, far too slow overall."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        self.end_headers()
        try:
            self.wfile.write(b"--b\r\nContent-Type: application/dicom\r\n\r\n")
            for _ in range(100):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.3)
        except OSError:
            pass  # the service hung up, as it should

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_slow_pacs_is_a_504_within_the_timeout(
    runtime: Any, examinations: tuple[Examination, Examination]
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answer, took = pull(
            runtime,
            examinations[0].datasets[0],
            dicomweb_url=f"http://127.0.0.1:{server.server_address[1]}/dicom-web",
            dicomweb_timeout_s=1,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert answer.status_code == 504
    assert answer.json()["error"]["code"] == "pacs_timeout"
    assert 1 <= took < 3


def test_an_instance_from_another_study_or_series_than_asked_is_a_502(
    runtime: Any, examinations: tuple[Examination, Examination]
) -> None:
    ct, cr = examinations
    sent = ct.files[0]

    class OneInstance(BaseHTTPRequestHandler):
        """A PACS that answers every retrieve with the same instance, whatever the path asked for."""

        def do_GET(self) -> None:
            body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + sent + b"\r\n--b--\r\n"
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), OneInstance)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    asked = ct.datasets[0]
    elsewhere = pydicom.Dataset()
    elsewhere.SOPInstanceUID = asked.SOPInstanceUID
    try:
        answers = {}
        for label, (study, series) in {
            "as asked": (asked.StudyInstanceUID, asked.SeriesInstanceUID),
            "another study": (cr.study_uid, asked.SeriesInstanceUID),
            "another series": (asked.StudyInstanceUID, cr.datasets[0].SeriesInstanceUID),
        }.items():
            elsewhere.StudyInstanceUID, elsewhere.SeriesInstanceUID = study, series
            answers[label], _ = pull(runtime, elsewhere, dicomweb_url=url)
    finally:
        server.shutdown()
        server.server_close()
    assert answers["as asked"].status_code == 200, answers["as asked"].text
    for label in ("another study", "another series"):
        assert answers[label].status_code == 502, answers[label].text
        assert "another instance" in answers[label].json()["error"]["message"]


# --- the answer sent to a FHIR server too (MEDMO_FHIR_URL) ---


def pull_with_fhir(
    runtime: Any,
    pacs: RunningOrthanc,
    credentials: Path,
    dataset: pydicom.Dataset,
    fhir_url: str,
    **settings: Any,
) -> Any:
    """/ground on a CT slice in the real Orthanc, its SR stored there, its bundle sent to `fhir_url`."""
    app = create_app(
        Settings(
            model="unused",
            dicomweb_url=f"{pacs.url}/dicom-web",
            dicomweb_credentials_file=credentials,
            fhir_url=fhir_url,
            **settings,
        ),
        runtime=runtime,
    )
    with TestClient(app) as client:
        return client.post(path(dataset, "ground"), json={"store": ["sr"]})


def test_each_answer_goes_to_the_fhir_server_as_a_valid_bundle_with_its_login(
    runtime: Any,
    pacs: RunningOrthanc,
    credentials: Path,
    examinations: tuple[Examination, Examination],
    tmp_path: Path,
) -> None:
    login = tmp_path / "fhir-login"
    login.write_text("Bearer fhir-token-for-tests-0001\n")
    slice_ = examinations[0].datasets[1]
    with fhir_server() as fhir:
        answer = pull_with_fhir(runtime, pacs, credentials, slice_, fhir.url, fhir_credentials_file=login)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["fhir"] == {
        "delivered": True,
        "status": 201,
        "location": f"{fhir.url}/Bundle/1/_history/1",
        "error": None,
    }
    assert [item["object"] for item in body["stored"]] == ["sr"]
    (received,) = fhir.received
    assert received.path == "/fhir/Bundle"
    assert received.bundle is not None, received.problem  # fhir.resources validated it
    assert received.headers["authorization"] == "Bearer fhir-token-for-tests-0001"
    assert received.headers["content-type"].startswith("application/fhir+json")
    resources = [entry["resource"] for entry in received.bundle["entry"]]
    (patient,) = [r for r in resources if r["resourceType"] == "Patient"]
    assert patient["identifier"] == [{"value": PATIENT_ID}]
    (study,) = [r for r in resources if r["resourceType"] == "ImagingStudy"]
    assert study["identifier"][0]["value"] == f"urn:oid:{slice_.StudyInstanceUID}"
    observations = [r for r in resources if r["resourceType"] == "Observation"]
    assert [o["code"]["text"] for o in observations] == [f["label"] for f in body["findings"]]


def test_a_fhir_server_answering_503_is_tried_again_and_a_redirect_is_refused_not_followed(
    runtime: Any, pacs: RunningOrthanc, credentials: Path, examinations: tuple[Examination, Examination]
) -> None:
    slice_ = examinations[0].datasets[3]
    with fhir_server() as fhir, fhir_server() as elsewhere:
        fhir.script = [(503, {})]
        retried = pull_with_fhir(runtime, pacs, credentials, slice_, fhir.url, dicomweb_retries=1)
        assert retried.status_code == 200, retried.text
        assert retried.json()["fhir"]["delivered"] is True
        assert len(fhir.received) == 2  # the 503, then the bundle taken
        assert all(received.bundle is not None for received in fhir.received)

        fhir.received.clear()
        fhir.script = [(307, {"Location": f"{elsewhere.url}/Bundle"})]
        redirected = pull_with_fhir(runtime, pacs, credentials, slice_, fhir.url, dicomweb_retries=1)
        fhir.script = [(503, {}), (503, {})]
        unavailable = pull_with_fhir(runtime, pacs, credentials, slice_, fhir.url, dicomweb_retries=1)
    # Not taken: the request still answers, with what the PACS stored, and says why.
    assert redirected.status_code == 200, redirected.text
    assert redirected.json()["fhir"] == {
        "delivered": False,
        "status": 307,
        "location": None,
        "error": "the FHIR server answered 307 sending the bundle",
    }
    assert elsewhere.received == []  # neither the bundle nor the login went where the redirect pointed
    assert [item["object"] for item in redirected.json()["stored"]] == ["sr"]
    assert unavailable.json()["fhir"]["delivered"] is False
    assert unavailable.json()["fhir"]["status"] == 503
    assert len(fhir.received) == 1 + 2  # the redirect once; the 503 tried twice (MEDMO_DICOMWEB_RETRIES=1)
