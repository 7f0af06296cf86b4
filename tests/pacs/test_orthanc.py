"""PACS routing end to end: a real Orthanc configured by docker/orthanc/ (its Python plugin running the
router), and MedMO Serve as a process.

Series stored in Orthanc reach the service once complete, as one request per task holding the series'
chosen images in anatomical order (evenly spaced slices of a CT, every view of a CR), captioned, and with
"Prior" the patient's previous study of that modality too; one answer per series and task comes back into
the series' study, referencing every image sent. When the service is down, overloaded or refusing,
nothing is lost, nothing is sent twice, and what fails is reported. A queue file the earlier version left,
of one request per instance, is still sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset

from bench.servers import RunningServer, free_port, serve
from tests.dicom_validator import dciodvfy_errors
from tests.pacs.orthanc import RunningOrthanc, orthanc, orthanc_binary
from tests.pacs.studies import PATIENT_ID, PATIENT_NAME, Examination, cr_study, ct_series
from tests.pacs.test_router_queue import write_per_instance_queue
from tests.pacs.test_router_requests import Received, form_parts

# Not skipped when Orthanc is missing: .ci/setup installs it, and a PACS test that silently does not run
# proves nothing.
assert orthanc_binary() is not None, (
    "Orthanc is not installed: bash .ci/setup (apt-get install orthanc orthanc-dicomweb orthanc-python)"
)

# One checkpoint answers one text to every prompt, so the reply must read as a report (findings, a blank
# line, the impression), as grounding (one labelled box) and as an answer. The model sees each 64x64 CT
# slice scaled to 256x256 and writes pixels of that picture: the box is x 0.25-0.75, y 0.25-0.5 of the
# image, so x 16-48, y 16-32 of the slice's pixels.
# In the syntax /ground is decoded under (MedMO's boxes), with an impression after a blank line.
REPLY = "Nodule <box>[[64, 64, 192, 128]]</box>\n\nNormal study."
CT_REGION = [16.0, 16.0, 48.0, 16.0, 48.0, 32.0, 16.0, 32.0, 16.0, 16.0]
QUESTION = "Is there a pleural effusion?"
TASKS = ("report", "ground", "ground:gsps", "vqa:effusion")
ROUTE_OF = {"report": "/report", "ground": "/ground", "ground:gsps": "/ground", "vqa:effusion": "/vqa"}
KEY = "pacs-routing-test-key-0001"
ROUTED_METADATA = "MedMORouted"
# Five slices of forty, each the middle of its eighth of the volume, counted from the bottom.
FIVE_OF_FORTY = [4, 12, 20, 28, 36]

FINDINGS, FINDING = ("121070", "DCM"), ("121071", "DCM")
IMPRESSION, REQUEST = ("121073", "DCM"), ("121062", "DCM")
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def routing(
    url: str, tasks: tuple[str, ...] = TASKS, ct: dict[str, Any] | None = None, **retry: float
) -> dict[str, Any]:
    """The "MedMO" section: CT series (5 slices unless `ct` says otherwise) and every CR image get
    `tasks`; failures retried quickly."""
    return {
        "Url": url,
        "ApiKey": KEY,
        "TimeoutSeconds": 60,
        "Modalities": {
            "CT": {"Tasks": list(tasks), "Instances": 5, **(ct or {})},
            "CR": {"Tasks": list(tasks)},
        },
        "Questions": {"effusion": QUESTION},
        "Retry": {"MaxAttempts": 1000, "FirstDelaySeconds": 0.2, "MaxDelaySeconds": 1.0, **retry},
    }


@pytest.fixture(scope="module")
def checkpoint(reply_checkpoint: Callable[[str], Path]) -> Path:
    return reply_checkpoint(REPLY)


def start_service(
    checkpoint: Path, log: Path, port: int | None = None
) -> AbstractContextManager[RunningServer]:
    return serve(checkpoint, log, env={"MEDMO_API_KEYS": KEY, "MEDMO_LOG_LEVEL": "debug"}, port=port)


@pytest.fixture(scope="module")
def medmo(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One service for the module: loading the model is the slow part."""
    with start_service(checkpoint, tmp_path_factory.mktemp("medmo") / "medmo.log") as server:
        yield server


# --- what the service was asked, and what Orthanc filed ---


def task_requests(service_log: str) -> list[dict[str, Any]]:
    """The access log's lines for task requests (route, status, modality, images, request id; no UIDs)."""
    records = [json.loads(line) for line in service_log.splitlines() if line.startswith("{")]
    return [
        r for r in records if r.get("logger") == "medmo.access" and r.get("method") == "POST" and "task" in r
    ]


def expected_requests(
    modalities: tuple[str, ...], tasks: tuple[str, ...] = TASKS
) -> Counter[tuple[str, str]]:
    """One request per series (here one per modality) and task."""
    return Counter((ROUTE_OF[task], modality) for task in tasks for modality in modalities)


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def kind_of(answer: Dataset) -> str:
    """Which task filed an answer: the presentation state, or the SR's series description."""
    if answer.Modality == "PR":
        return "ground:gsps"
    description = str(answer.SeriesDescription)
    return next(
        task
        for prefix, task in (("AI report", "report"), ("AI grounding", "ground"), ("AI VQA", "vqa:effusion"))
        if description.startswith(prefix)
    )


def evidence(sequence: Any) -> list[str]:
    """The SOP Instance UIDs an SR's evidence sequence (studies, series, instances) lists."""
    return [
        str(reference.ReferencedSOPInstanceUID)
        for study in sequence
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    ]


def referenced_images(answer: Dataset) -> list[str]:
    """The images an answer is about: a presentation state's, or the SR's current evidence."""
    if answer.Modality == "PR":
        return [
            str(image.ReferencedSOPInstanceUID)
            for series in answer.ReferencedSeriesSequence
            for image in series.ReferencedImageSequence
        ]
    return evidence(answer.CurrentRequestedProcedureEvidenceSequence)


def filed(pacs: RunningOrthanc, study_id: str, examination: Examination) -> list[Dataset]:
    """The answers filed in an Orthanc study, each checked to be in the source's patient and study."""
    sources = {dataset.SOPInstanceUID for dataset in examination.datasets}
    answers = []
    for instance in pacs.study_instances(study_id):
        if instance["MainDicomTags"]["SOPInstanceUID"] in sources:
            continue
        answer = read(pacs.instance_file(instance["ID"]))
        assert answer.StudyInstanceUID == examination.study_uid
        assert answer.PatientID == PATIENT_ID
        answers.append(answer)
    return answers


def tasks_filed(answers: list[Dataset]) -> dict[str, list[str]]:
    """Each task filed, with the images its answer references (sorted)."""
    by_task: dict[str, list[str]] = {}
    for answer in answers:
        assert kind_of(answer) not in by_task, f"{kind_of(answer)} filed twice"
        by_task[kind_of(answer)] = sorted(referenced_images(answer))
    return by_task


def wait_for_instances(
    pacs: RunningOrthanc, study_id: str, count: int, medmo: RunningServer | None, timeout_s: float = 90
) -> None:
    """Poll until the study holds `count` instances; fail with both logs if it does not in time."""
    deadline = time.monotonic() + timeout_s
    while len(pacs.study_instances(study_id)) < count:
        if time.monotonic() > deadline:
            service_log = f"\n--- MedMO Serve log ---\n{medmo.log()}" if medmo else ""
            pytest.fail(
                f"the study holds fewer than {count} instances after {timeout_s} s\n--- Orthanc log ---\n{pacs.log()}{service_log}"
            )
        time.sleep(0.2)


def idle(queue: dict[str, Any]) -> bool:
    """Nothing arriving, to plan or to send: a series still short of StableAge counts as arriving."""
    return not any(
        queue[count] for count in ("series_arriving", "series_to_plan", "work_pending", "in_flight")
    )


def children(item: Dataset, name: tuple[str, str]) -> list[Dataset]:
    return [
        child
        for child in item.get("ContentSequence", [])
        if (
            child.ConceptNameCodeSequence[0].CodeValue,
            child.ConceptNameCodeSequence[0].CodingSchemeDesignator,
        )
        == name
    ]


def measurement_report(answer: Dataset) -> hd.sr.MeasurementReport:
    """An SR the router filed, read back by highdicom as the TID 1500 Measurement Report it must be."""
    assert answer.SOPClassUID == COMPREHENSIVE_3D_SR
    document = hd.sr.srread(_bytes(answer))
    assert isinstance(document, hd.sr.Comprehensive3DSR)
    return hd.sr.MeasurementReport.from_sequence([document], copy=False)


def evaluations(answer: Dataset) -> list[tuple[tuple[str, str], str]]:
    """The report's qualitative evaluations: (concept, text) in order."""
    (container,) = children(answer, QUALITATIVE_EVALUATIONS)
    return [
        (
            (
                item.ConceptNameCodeSequence[0].CodeValue,
                item.ConceptNameCodeSequence[0].CodingSchemeDesignator,
            ),
            item.TextValue,
        )
        for item in container.ContentSequence
    ]


def regions(answer: Dataset) -> list[tuple[str, str, list[float]]]:
    """Each measurement group's region: (tracking id, source SOP Instance UID, polyline)."""
    found = []
    for group in measurement_report(answer).get_planar_roi_measurement_groups():
        assert group.roi is not None
        found.append(
            (
                str(group.tracking_identifier),
                str(group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
                [float(v) for v in group.roi.GraphicData],
            )
        )
    return found


def check_contents(answers: list[Dataset], slices: list[str], grounded: dict[str, Any] | None = None) -> None:
    """What each task filed about a CT's `slices` (SOP Instance UIDs, as sent): the report's sections, the
    box on each slice, the question answered; with `grounded` (the service's JSON answer to the same
    /ground request), the same regions, in its order, with tracking ids numbered as its findings."""
    by_kind = {kind_of(answer): answer for answer in answers}
    report = by_kind["report"]
    measurement_report(report)
    assert evaluations(report) == [
        (FINDINGS, "Nodule <box>[[64, 64, 192, 128]]</box>"),
        (IMPRESSION, "Normal study."),
    ]

    # Each slice grounded on its own: one finding per slice, its region on that slice.
    found = regions(by_kind["ground"])
    assert sorted(uid for _, uid, _ in found) == sorted(slices)
    for _, _, polyline in found:
        assert polyline == pytest.approx(CT_REGION, abs=1e-3)
    if grounded is not None:
        findings = grounded["findings"]
        assert [tracking for tracking, _, _ in found] == [f"finding {n}" for n in range(1, len(findings) + 1)]
        assert [uid for _, uid, _ in found] == [finding["sop_instance_uid"] for finding in findings]
        for (_, _, polyline), finding in zip(found, findings, strict=True):
            box = finding["box_px"]
            assert polyline[:4] == pytest.approx([box["x_min"], box["y_min"], box["x_max"], box["y_min"]])
        labels = [
            item.TextValue
            for group in measurement_report(by_kind["ground"]).get_planar_roi_measurement_groups()
            for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.RelationshipType == "CONTAINS"
        ]
        assert labels == [finding["label"] for finding in findings]

    state = by_kind["ground:gsps"]
    assert sorted(
        str(annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for annotation in state.GraphicAnnotationSequence
    ) == sorted(slices)
    for annotation in state.GraphicAnnotationSequence:
        (box,) = annotation.GraphicObjectSequence
        assert [float(v) for v in box.GraphicData] == pytest.approx(CT_REGION, abs=1e-3)

    vqa = by_kind["vqa:effusion"]
    measurement_report(vqa)
    assert evaluations(vqa)[0] == (REQUEST, QUESTION)


def valid_answers(answers: list[Dataset], folder: Path) -> int:
    """Every filed answer passes dciodvfy; how many were checked."""
    for answer in answers:
        assert dciodvfy_errors(_bytes(answer).getvalue(), folder) == [], kind_of(answer)
    return len(answers)


def json_answer(medmo: RunningServer, front: Gate, route: str, modality: str) -> dict[str, Any]:
    """The service's JSON answer to the request the router sent to `route` for a series of `modality`,
    sent again as it was, asking for JSON."""
    for request in front.received:
        if request.path == route and sent([request], route)[0][0][0].Modality == modality:
            answer = httpx.post(
                medmo.url + route,
                content=request.body,
                headers={
                    "Content-Type": request.headers["content-type"],
                    "Authorization": request.headers["authorization"],
                    "Accept": "application/json",
                },
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            result: dict[str, Any] = answer.json()
            return result
    raise AssertionError(f"the router sent no {route} request for the {modality}")


def _bytes(dataset: Dataset) -> io.BytesIO:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    buffer.seek(0)
    return buffer


def no_patient_data(lines: list[str], examination: Examination) -> None:
    identifying = (
        PATIENT_NAME,
        PATIENT_ID,
        str(examination.datasets[0].AccessionNumber),
        examination.study_uid,
    )
    for line in lines:
        for value in identifying:
            assert value not in line, line
        for dataset in examination.datasets:
            assert dataset.SOPInstanceUID not in line, line


def by_position(examination: Examination) -> list[Dataset]:
    """A CT's slices from the bottom up."""
    return sorted(examination.datasets, key=lambda dataset: float(dataset.ImagePositionPatient[2]))


def sent(received: list[Received], route: str) -> list[tuple[list[Dataset], list[str], dict[str, str]]]:
    """The requests to `route` a front recorded: the images of each (read as DICOM), its captions and its
    other fields, in the order sent."""
    requests = []
    for request in received:
        if request.path != route:
            continue
        images, captions, fields = [], [], {}
        for name, content in form_parts(request.headers["content-type"], request.body):
            if name == "image":
                images.append(read(content))
            elif name == "caption":
                captions.append(content.decode())
            else:
                fields[name] = content.decode()
        requests.append((images, captions, fields))
    return requests


# --- the tests ---


class Gate:
    """A stand-in for the service's front door: it answers as scripted (429 with Retry-After, 503) or
    passes the request on to the real service, and notes each request and when it arrived. What is
    simulated is an overloaded or failing service, not the router under test."""

    def __init__(self, service_url: str, script: Callable[[int], tuple[int, dict[str, str]] | None]) -> None:
        self.arrivals: list[tuple[float, str]] = []  # (time.monotonic(), X-Request-ID)
        self.received: list[Received] = []
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                gate.arrivals.append((time.monotonic(), self.headers.get("X-Request-ID", "")))
                gate.received.append(
                    Received(self.path, {name.lower(): value for name, value in self.headers.items()}, body)
                )
                scripted = script(len(gate.arrivals) - 1)
                if scripted is None:
                    passed = {
                        name: self.headers[name]
                        for name in ("Content-Type", "Accept", "Authorization", "X-Request-ID")
                        if name in self.headers
                    }
                    answer = httpx.post(service_url + self.path, content=body, headers=passed, timeout=60)
                    status, headers, content = (
                        answer.status_code,
                        {"Content-Type": answer.headers["content-type"]},
                        answer.content,
                    )
                else:
                    status, headers = scripted
                    content = b'{"error": {"code": "overloaded", "message": "busy", "request_id": null}}'
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(content))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Gate:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def passing(medmo: RunningServer) -> Gate:
    """A front that passes every request on, recording it."""
    return Gate(medmo.url, lambda n: None)


def test_a_ct_series_and_a_cr_study_are_each_one_request_per_task_and_one_answer_per_task(
    medmo: RunningServer, tmp_path: Path
) -> None:
    ct, cr = ct_series(40), cr_study(("PA", "LL"))
    five = [by_position(ct)[index] for index in FIVE_OF_FORTY]
    five_uids = [slice_.SOPInstanceUID for slice_ in five]
    views = [image.SOPInstanceUID for image in cr.datasets]
    with passing(medmo) as front, orthanc(tmp_path, routing(front.url)) as pacs:
        asked_before = len(task_requests(medmo.log()))
        # As a modality sends them: in no particular order.
        stored = [pacs.store(data) for data in ct.files[::2] + cr.files + ct.files[1::2]]
        ct_study, cr_study_id = stored[0]["ParentStudy"], stored[len(ct.files) // 2]["ParentStudy"]
        wait_for_instances(pacs, ct_study, 40 + len(TASKS), medmo)
        wait_for_instances(pacs, cr_study_id, 2 + len(TASKS), medmo)
        pacs.wait_for_queue(idle, 30, "the queue empties")

        # The service was asked exactly once per series and task, each request holding the series' images.
        asked = task_requests(medmo.log())[asked_before:]
        assert Counter((r["path"], r["modality"]) for r in asked) == expected_requests(("CT", "CR"))
        assert {r["status"] for r in asked} == {200}
        assert {r["images"] for r in asked if r["modality"] == "CT"} == {5}
        assert {r["images"] for r in asked if r["modality"] == "CR"} == {2}
        assert len({r["request_id"] for r in asked}) == len(asked)  # one per series and task

        # The CT's five slices evenly spaced through the volume, from the bottom up, captioned by place;
        # the CR's views in their order, captioned by view; the question in the form.
        for route in ("/report", "/ground", "/vqa"):
            for images, captions, fields in sent(front.received, route):
                if images[0].Modality == "CT":
                    heights = [float(image.ImagePositionPatient[2]) for image in images]
                    assert heights == sorted(heights)
                    assert heights == [float(slice_.ImagePositionPatient[2]) for slice_ in five]
                    assert [image.SOPInstanceUID for image in images] == five_uids
                    assert captions == [f"slice {index + 1} of 40" for index in FIVE_OF_FORTY]
                else:
                    assert [image.SOPInstanceUID for image in images] == views
                    assert captions == ["PA", "LL"]
                assert fields == ({"question": QUESTION} if route == "/vqa" else {})

        # One answer per task in each series' study, referencing every image sent.
        ct_answers = filed(pacs, ct_study, ct)
        assert tasks_filed(ct_answers) == {task: sorted(five_uids) for task in TASKS}
        check_contents(ct_answers, five_uids, json_answer(medmo, front, "/ground", "CT"))
        cr_answers = filed(pacs, cr_study_id, cr)
        assert tasks_filed(cr_answers) == {task: sorted(views) for task in TASKS}
        # The CR study's measurement reports too: a region per view, as the service's JSON has them.
        cr_grounded = json_answer(medmo, front, "/ground", "CR")
        (cr_ground,) = [answer for answer in cr_answers if kind_of(answer) == "ground"]
        assert [uid for _, uid, _ in regions(cr_ground)] == [
            f["sop_instance_uid"] for f in cr_grounded["findings"]
        ]
        (cr_report,) = [answer for answer in cr_answers if kind_of(answer) == "report"]
        assert evaluations(cr_report)[-1] == (IMPRESSION, "Normal study.")
        # Every answer filed (a measurement report per task, a presentation state) is valid DICOM: 8 objects.
        assert valid_answers(ct_answers, tmp_path) + valid_answers(cr_answers, tmp_path) == 2 * len(TASKS)
        # The tasks done are recorded on each series, not on its images.
        for series_id in (stored[0]["ParentSeries"], stored[len(ct.files) // 2]["ParentSeries"]):
            metadata = pacs.get_json(f"/series/{series_id}/metadata?expand")
            assert metadata.get(ROUTED_METADATA) == ",".join(sorted(TASKS))
        assert not any(
            pacs.get_json(f"/instances/{instance['ID']}/metadata?expand").get(ROUTED_METADATA)
            for instance in pacs.study_instances(ct_study) + pacs.study_instances(cr_study_id)
        )

        # Stored again, with one more slice on top: Orthanc calls the CT series stable again and the router
        # plans it again, and nothing new is asked or filed: each task is done for the series.
        planned = f"series {stored[0]['ParentSeries']} (CT): "
        assert [line.split(planned)[1] for line in pacs.router_lines() if planned in line] == [
            f"{len(TASKS)} to send"
        ]
        assert {pacs.store(data)["Status"] for data in ct.files + cr.files} == {"AlreadyStored"}
        assert pacs.store(ct.extra_slice_on_top())["Status"] == "Success"
        pacs.wait_for_line(planned + "0 to send", 30)
        pacs.wait_for_queue(idle, 30, "the queue empties")
        # Nothing more than the router's requests and the two JSON answers asked for above.
        assert len(task_requests(medmo.log())) - asked_before == len(asked) + 2
        assert len(pacs.study_instances(ct_study)) == 41 + len(TASKS)
        assert len(pacs.study_instances(cr_study_id)) == 2 + len(TASKS)
        no_patient_data(pacs.router_lines(), ct)
        no_patient_data(pacs.router_lines(), cr)


def test_a_study_with_a_prior_is_reported_on_with_the_prior_images_after_its_own(
    medmo: RunningServer, tmp_path: Path
) -> None:
    prior = ct_series(30, study_date="20240312")
    current = ct_series(40, study_date="20250312")
    # Of the same patient, in between, but not a CT: no prior for a CT.
    radiograph = cr_study(("PA",), study_date="20250101")
    tasks = ("report", "ground:gsps")
    prior_three = [by_position(prior)[index] for index in (5, 15, 25)]
    current_five = [by_position(current)[index] for index in FIVE_OF_FORTY]
    with passing(medmo) as front, orthanc(tmp_path, routing(front.url, tasks, ct={"Prior": True})) as pacs:
        # The prior arrives first, and is routed too (it has no prior of its own).
        prior_stored = [pacs.store(data) for data in prior.files]
        radiograph_study = pacs.store(radiograph.files[0])["ParentStudy"]
        wait_for_instances(pacs, prior_stored[0]["ParentStudy"], 30 + len(tasks), medmo)
        wait_for_instances(pacs, radiograph_study, 1 + len(tasks), medmo)
        pacs.wait_for_queue(idle, 30, "the prior and the radiograph are routed")
        routed_before = len(front.received)
        stored = [pacs.store(data) for data in current.files]
        current_study = stored[0]["ParentStudy"]
        wait_for_instances(pacs, current_study, 40 + len(tasks), medmo)
        pacs.wait_for_queue(idle, 30, "the queue empties")
        planned = pacs.wait_for_line(f"series {stored[0]['ParentSeries']} (CT): ", 5)
        answers = {kind_of(answer): answer for answer in filed(pacs, current_study, current)}
        lines = pacs.router_lines()

    # The report request: the five current slices, then three of the prior (MaxImages 8), evenly spaced
    # through its volume, each captioned with its study and date.
    asked = front.received[routed_before:]
    ((images, captions, _),) = sent(asked, "/report")
    assert [image.SOPInstanceUID for image in images] == [
        dataset.SOPInstanceUID for dataset in current_five + prior_three
    ]
    assert captions == [f"current, 2025-03-12, slice {index + 1} of 40" for index in FIVE_OF_FORTY] + [
        f"prior, 2024-03-12, slice {index + 1} of 30" for index in (5, 15, 25)
    ]
    # Grounding is not asked of a prior: the presentation state's request holds the current slices only.
    ((images, captions, _),) = sent(asked, "/ground")
    assert [image.SOPInstanceUID for image in images] == [dataset.SOPInstanceUID for dataset in current_five]
    assert captions == [f"slice {index + 1} of 40" for index in FIVE_OF_FORTY]
    assert planned.endswith(f"2 to send, compared with series {prior_stored[0]['ParentSeries']}")

    # The report is filed in the current study, its slices the evidence, the prior's as other evidence.
    report = answers["report"]
    measurement_report(report)
    assert sorted(evidence(report.CurrentRequestedProcedureEvidenceSequence)) == sorted(
        dataset.SOPInstanceUID for dataset in current_five
    )
    assert sorted(evidence(report.PertinentOtherEvidenceSequence)) == sorted(
        dataset.SOPInstanceUID for dataset in prior_three
    )
    assert [study.StudyInstanceUID for study in report.PertinentOtherEvidenceSequence] == [prior.study_uid]
    assert sorted(referenced_images(answers["ground:gsps"])) == sorted(
        dataset.SOPInstanceUID for dataset in current_five
    )
    for examination in (current, prior, radiograph):
        no_patient_data(lines, examination)


def test_while_the_service_is_down_and_orthanc_restarts_every_answer_waits_and_arrives_once(
    checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()  # where the service will answer, once it is started
    ct, cr = ct_series(40), cr_study(("PA", "LL"))
    (tmp_path / "pacs").mkdir()
    # A StableAge long enough that storing 42 files ends well before it, on a machine running another test
    # beside this one.
    with orthanc(tmp_path / "pacs", routing(f"http://127.0.0.1:{port}"), stable_age_s=12) as pacs:
        stored = [pacs.store(data) for data in ct.files + cr.files]
        ct_study, cr_study_id = stored[0]["ParentStudy"], stored[-1]["ParentStudy"]
        # Stopped before the series are stable (12 s): Orthanc forgets that it waited on them; the router's
        # queue file does not.
        pacs.restart()
        assert any("2 series interrupted by a restart" in line for line in pacs.router_lines()), pacs.log()
        # Planned once quiet for StableAge, then sent to a service that is not there: connection refused,
        # retried with backoff. One request per series and task.
        pacs.wait_for_queue(
            lambda q: q["work_pending"] == 2 * len(TASKS) and q["retried"] >= 2, 45, "work queued, retried"
        )
        # Stopped again with everything still to send.
        pacs.restart()
        assert pacs.queue()["work_pending"] == 2 * len(TASKS)

        with start_service(checkpoint, tmp_path / "medmo.log", port=port) as medmo:
            wait_for_instances(pacs, ct_study, 40 + len(TASKS), medmo)
            wait_for_instances(pacs, cr_study_id, 2 + len(TASKS), medmo)
            pacs.wait_for_queue(idle, 30, "the queue empties")
            asked = task_requests(medmo.log())

        # Each series and task reached the service once: 8 requests, 8 distinct items (the router's
        # X-Request-ID is one per series and task, the same at each attempt), all answered.
        assert Counter((r["path"], r["modality"]) for r in asked) == expected_requests(("CT", "CR"))
        assert {r["status"] for r in asked} == {200}
        assert len({r["request_id"] for r in asked}) == len(asked)
        five = sorted(by_position(ct)[index].SOPInstanceUID for index in FIVE_OF_FORTY)
        assert tasks_filed(filed(pacs, ct_study, ct)) == {task: five for task in TASKS}
        views = sorted(image.SOPInstanceUID for image in cr.datasets)
        assert tasks_filed(filed(pacs, cr_study_id, cr)) == {task: views for task in TASKS}
        no_patient_data(pacs.router_lines(), ct)
        no_patient_data(pacs.router_lines(), cr)


def test_a_queue_file_left_by_the_per_instance_router_is_sent_one_image_a_request(
    medmo: RunningServer, tmp_path: Path
) -> None:
    cr = cr_study(("PA", "LL"))
    with orthanc(tmp_path, routing(medmo.url, tasks=())) as pacs:  # stored, not routed
        stored = [pacs.store(data) for data in cr.files]
    instance_ids, study_id = [s["ID"] for s in stored], stored[0]["ParentStudy"]
    # What the earlier version left queued when it was replaced: one item per instance, one retried.
    queue_file = tmp_path / "index" / "medmo-queue.sqlite"
    for leftover in tmp_path.glob("index/medmo-queue.sqlite*"):
        leftover.unlink()
    write_per_instance_queue(
        queue_file,
        [
            (instance_ids[0], "report", cr.series_uid, 3, 0.0),
            (instance_ids[1], "report", cr.series_uid, 0, 0.0),
        ],
    )
    asked_before = len(task_requests(medmo.log()))
    with orthanc(tmp_path, routing(medmo.url, tasks=("report",))) as pacs:
        wait_for_instances(pacs, study_id, 2 + 2, medmo)
        pacs.wait_for_queue(idle, 30, "the queue empties")
        answers = filed(pacs, study_id, cr)
        routed = pacs.get_json(f"/series/{stored[0]['ParentSeries']}/metadata?expand").get(ROUTED_METADATA)
        lines = pacs.router_lines()
    asked = task_requests(medmo.log())[asked_before:]
    # Each item is the one-image request it was, under the X-Request-ID it had.
    assert [(r["path"], r["images"], r["status"]) for r in asked] == [("/report", 1, 200)] * 2
    assert {r["request_id"] for r in asked} == {
        f"orthanc-{hashlib.sha256(instance_id.encode()).hexdigest()[:20]}-report"
        for instance_id in instance_ids
    }
    assert sorted(referenced_images(answer)[0] for answer in answers) == sorted(
        d.SOPInstanceUID for d in cr.datasets
    )
    assert routed == "report"  # the series is done: stored again, it files nothing new
    no_patient_data(lines, cr)


def test_an_overloaded_service_is_given_the_pause_it_asks_for(medmo: RunningServer, tmp_path: Path) -> None:
    # Retry-After says 2 s; the router's own first pause would be 0.2 s.
    with Gate(medmo.url, lambda n: (429, {"Retry-After": "2"}) if n == 0 else None) as front:
        cr = cr_study(("PA",))
        with orthanc(tmp_path, routing(front.url, tasks=("report",))) as pacs:
            stored = pacs.store(cr.files[0])
            wait_for_instances(pacs, stored["ParentStudy"], 2, medmo)
            pacs.wait_for_queue(idle, 30, "the queue empties")
            assert tasks_filed(filed(pacs, stored["ParentStudy"], cr)) == {
                "report": [cr.datasets[0].SOPInstanceUID]
            }
    (refused_at, first_id), (accepted_at, second_id) = front.arrivals
    assert accepted_at - refused_at >= 2.0
    assert first_id == second_id  # the same item, sent again
    refused, accepted = (form_parts(r.headers["content-type"], r.body) for r in front.received)
    assert refused == accepted  # and the same request


def test_a_service_that_keeps_failing_is_given_up_and_reported_with_the_series_uid_only(
    tmp_path: Path,
) -> None:
    with Gate("http://127.0.0.1:9", lambda n: (503, {})) as front:
        cr = cr_study(("PA", "LL"))
        with orthanc(tmp_path, routing(front.url, tasks=("report",), MaxAttempts=3)) as pacs:
            stored = [pacs.store(data) for data in cr.files]
            line = pacs.wait_for_line("failed for series", 30)
            pacs.wait_for_queue(idle, 30, "the queue empties")
            assert sorted(i["ID"] for i in pacs.study_instances(stored[0]["ParentStudy"])) == sorted(
                s["ID"] for s in stored
            )
            lines = pacs.router_lines()
    # One request for the series (both views), tried three times, then reported once.
    assert len(front.arrivals) == 3
    assert len({request_id for _, request_id in front.arrivals}) == 1
    assert [len(sent([request], "/report")[0][0]) for request in front.received] == [2, 2, 2]
    assert line.endswith(f"MedMO router: report failed for series {cr.series_uid}: HTTP 503 after 3 attempts")
    assert len([line for line in lines if "failed for series" in line]) == 1
    no_patient_data(lines, cr)


def test_an_image_the_model_cannot_use_is_reported_at_once(medmo: RunningServer, tmp_path: Path) -> None:
    with passing(medmo) as front:
        too_small = cr_study(("PA",), size=16)  # the model needs 32 pixels a side
        with orthanc(tmp_path, routing(front.url, tasks=("report",))) as pacs:
            pacs.store(too_small.files[0])
            line = pacs.wait_for_line("failed for series", 30)
            assert pacs.queue()["work_pending"] == 0
    assert len(front.arrivals) == 1
    assert line.endswith(
        f"report failed for series {too_small.series_uid}: the service refused it (422 unusable_image)"
    )
