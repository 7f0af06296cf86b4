"""PACS routing end to end: a real Orthanc configured by docker/orthanc/ (its Python plugin running the
router), and MedMO Serve as a process.

Series stored in Orthanc reach the service once complete, one image per cross-sectional series and every
image of a projection one; the answers come back into the source's study. When the service is down,
overloaded or refusing, nothing is lost, nothing is sent twice, and what fails is reported.
"""

from __future__ import annotations

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
from tests.pacs.orthanc import RunningOrthanc, orthanc, orthanc_binary
from tests.pacs.studies import PATIENT_ID, PATIENT_NAME, Examination, cr_study, ct_series, middle_by_position

# Not skipped when Orthanc is missing: .ci/setup installs it, and a PACS test that silently does not run
# proves nothing.
assert orthanc_binary() is not None, (
    "Orthanc is not installed: bash .ci/setup (apt-get install orthanc orthanc-dicomweb orthanc-python)"
)

# One checkpoint answers one text to every prompt, so the reply must read as a report (findings, a blank
# line, the impression), as grounding (one labelled box) and as an answer. The model sees the 64x64 CT
# slice scaled to 256x256 and writes pixels of that picture: the box is x 0.25-0.75, y 0.25-0.5 of the
# image, so x 16-48, y 16-32 of the slice's pixels.
REPLY = "Nodule: [64, 64, 192, 128]\n\nNormal study."
CT_REGION = [16.0, 16.0, 48.0, 16.0, 48.0, 32.0, 16.0, 32.0, 16.0, 16.0]
QUESTION = "Is there a pleural effusion?"
TASKS = ("report", "ground", "ground:gsps", "vqa:effusion")
ROUTE_OF = {"report": "/report", "ground": "/ground", "ground:gsps": "/ground", "vqa:effusion": "/vqa"}
KEY = "pacs-routing-test-key-0001"
ROUTED_METADATA = "MedMORouted"

FINDINGS, FINDING = ("121070", "DCM"), ("121071", "DCM")
IMPRESSIONS, IMPRESSION = ("121072", "DCM"), ("121073", "DCM")
REQUEST, IMAGE_REGION = ("121062", "DCM"), ("111030", "DCM")


def routing(url: str, tasks: tuple[str, ...] = TASKS, **retry: float) -> dict[str, Any]:
    """The "MedMO" section: CT's middle slice and every CR image get `tasks`; failures retried quickly."""
    return {
        "Url": url,
        "ApiKey": KEY,
        "TimeoutSeconds": 60,
        "Modalities": {"CT": {"Tasks": list(tasks), "Instances": 1}, "CR": {"Tasks": list(tasks)}},
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
    """The access log's lines for task requests (route, status, modality, request id; no UIDs)."""
    records = [json.loads(line) for line in service_log.splitlines() if line.startswith("{")]
    return [
        r for r in records if r.get("logger") == "medmo.access" and r.get("method") == "POST" and "task" in r
    ]


def expected_requests(
    ct_images: int, cr_images: int, tasks: tuple[str, ...] = TASKS
) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for task in tasks:
        counts[(ROUTE_OF[task], "CT")] += ct_images
        counts[(ROUTE_OF[task], "CR")] += cr_images
    return counts


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


def referenced_image(answer: Dataset) -> str:
    if answer.Modality == "PR":
        return str(answer.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    (uid,) = {
        reference.ReferencedSOPInstanceUID
        for study in answer.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }
    return str(uid)


def answers(pacs: RunningOrthanc, study_id: str, examination: Examination) -> dict[str, list[Dataset]]:
    """The answers filed in an Orthanc study, by the SOP Instance UID of the image each refers to; each
    checked to be in the source's patient and study."""
    sources = {dataset.SOPInstanceUID for dataset in examination.datasets}
    filed: dict[str, list[Dataset]] = {}
    for instance in pacs.study_instances(study_id):
        if instance["MainDicomTags"]["SOPInstanceUID"] in sources:
            continue
        answer = read(pacs.instance_file(instance["ID"]))
        assert answer.StudyInstanceUID == examination.study_uid
        assert answer.PatientID == PATIENT_ID
        filed.setdefault(referenced_image(answer), []).append(answer)
    return filed


def tasks_by_image(filed: dict[str, list[Dataset]]) -> dict[str, list[str]]:
    return {uid: sorted(kind_of(answer) for answer in found) for uid, found in filed.items()}


def wait_for_instances(
    pacs: RunningOrthanc, study_id: str, count: int, medmo: RunningServer | None, timeout_s: float = 60
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
    return queue["work_pending"] == 0 and queue["in_flight"] == 0 and queue["series_to_plan"] == 0


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


def check_contents(filed: list[Dataset]) -> None:
    """What each task filed says: the report's sections, the box on the slice, the question answered."""
    by_kind = {kind_of(answer): answer for answer in filed}
    report = by_kind["report"]
    assert isinstance(hd.sr.srread(_bytes(report)), hd.sr.ComprehensiveSR)
    (findings,) = children(report, FINDINGS)
    assert [f.TextValue for f in children(findings, FINDING)] == ["Nodule: [64, 64, 192, 128]"]
    (impressions,) = children(report, IMPRESSIONS)
    assert [i.TextValue for i in children(impressions, IMPRESSION)] == ["Normal study."]

    (grounding_findings,) = children(by_kind["ground"], FINDINGS)
    (finding,) = children(grounding_findings, FINDING)
    (region,) = children(finding, IMAGE_REGION)
    assert [float(v) for v in region.GraphicData] == pytest.approx(CT_REGION, abs=1e-3)

    state = by_kind["ground:gsps"]
    (annotation,) = state.GraphicAnnotationSequence
    (box,) = annotation.GraphicObjectSequence
    assert [float(v) for v in box.GraphicData] == pytest.approx(CT_REGION, abs=1e-3)

    vqa = by_kind["vqa:effusion"]
    assert [item.TextValue for item in children(vqa, REQUEST)] == [QUESTION]


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


# --- the tests ---


def test_a_ct_series_and_a_cr_study_get_one_answer_per_task_for_each_chosen_image(
    medmo: RunningServer, tmp_path: Path
) -> None:
    ct, cr = ct_series(40), cr_study(("PA", "LL"))
    middle = middle_by_position(ct)
    with orthanc(tmp_path, routing(medmo.url)) as pacs:
        asked_before = len(task_requests(medmo.log()))
        # As a modality sends them: in no particular order.
        stored = [pacs.store(data) for data in ct.files[::2] + cr.files + ct.files[1::2]]
        ct_study, cr_study_id = stored[0]["ParentStudy"], stored[len(ct.files) // 2]["ParentStudy"]
        wait_for_instances(pacs, ct_study, 40 + len(TASKS), medmo)
        wait_for_instances(pacs, cr_study_id, 2 + 2 * len(TASKS), medmo)
        pacs.wait_for_queue(idle, 30, "the queue empties")

        # The service was asked exactly once per task for the CT's middle slice and for each CR image.
        asked = task_requests(medmo.log())[asked_before:]
        assert Counter((r["path"], r["modality"]) for r in asked) == expected_requests(1, 2)
        assert {r["status"] for r in asked} == {200}
        assert len({r["request_id"] for r in asked}) == len(asked)  # one per image and task

        # And exactly those answers are filed, in each image's own study, referring to it.
        ct_answers = answers(pacs, ct_study, ct)
        assert tasks_by_image(ct_answers) == {middle.SOPInstanceUID: sorted(TASKS)}
        check_contents(ct_answers[middle.SOPInstanceUID])
        assert tasks_by_image(answers(pacs, cr_study_id, cr)) == {
            image.SOPInstanceUID: sorted(TASKS) for image in cr.datasets
        }
        # The tasks done are recorded on the images sent, and only there.
        routed = {
            instance["MainDicomTags"]["SOPInstanceUID"]: pacs.get_json(
                f"/instances/{instance['ID']}/metadata?expand"
            ).get(ROUTED_METADATA)
            for instance in pacs.study_instances(ct_study) + pacs.study_instances(cr_study_id)
            if instance["MainDicomTags"]["SOPInstanceUID"]
            in {d.SOPInstanceUID for d in ct.datasets + cr.datasets}
        }
        sent = {middle.SOPInstanceUID, *(image.SOPInstanceUID for image in cr.datasets)}
        assert {uid for uid, tasks in routed.items() if tasks} == sent
        assert {routed[uid] for uid in sent} == {",".join(sorted(TASKS))}

        # Stored again, with one more slice on top (the middle stays the middle): Orthanc calls the CT
        # series stable again and the router plans it again, and nothing new is asked or filed.
        planned = f"series {stored[0]['ParentSeries']} (CT): "
        assert [line.split(planned)[1] for line in pacs.router_lines() if planned in line] == [
            f"{len(TASKS)} to send"
        ]
        assert {pacs.store(data)["Status"] for data in ct.files + cr.files} == {"AlreadyStored"}
        assert pacs.store(ct.extra_slice_on_top())["Status"] == "Success"
        pacs.wait_for_line(planned + "0 to send", 30)
        pacs.wait_for_queue(idle, 30, "the queue empties")
        assert len(task_requests(medmo.log())) - asked_before == sum(expected_requests(1, 2).values())
        assert len(pacs.study_instances(ct_study)) == 41 + len(TASKS)
        assert len(pacs.study_instances(cr_study_id)) == 2 + 2 * len(TASKS)
        no_patient_data(pacs.router_lines(), ct)
        no_patient_data(pacs.router_lines(), cr)


def test_while_the_service_is_down_and_orthanc_restarts_every_answer_waits_and_arrives_once(
    checkpoint: Path, tmp_path: Path
) -> None:
    port = free_port()  # where the service will answer, once it is started
    ct, cr = ct_series(40), cr_study(("PA", "LL"))
    (tmp_path / "pacs").mkdir()
    with orthanc(tmp_path / "pacs", routing(f"http://127.0.0.1:{port}"), stable_age_s=5) as pacs:
        stored = [pacs.store(data) for data in ct.files + cr.files]
        ct_study, cr_study_id = stored[0]["ParentStudy"], stored[-1]["ParentStudy"]
        # Stopped before the series are stable (5 s): Orthanc forgets that it waited on them; the router's
        # queue file does not.
        pacs.restart()
        assert any("2 series interrupted by a restart" in line for line in pacs.router_lines()), pacs.log()
        # Planned once quiet for StableAge, then sent to a service that is not there: connection refused,
        # retried with backoff.
        pacs.wait_for_queue(
            lambda q: q["work_pending"] == 3 * len(TASKS) and q["retried"] >= 2, 30, "work queued, retried"
        )
        # Stopped again with everything still to send.
        pacs.restart()
        assert pacs.queue()["work_pending"] == 3 * len(TASKS)

        with start_service(checkpoint, tmp_path / "medmo.log", port=port) as medmo:
            wait_for_instances(pacs, ct_study, 40 + len(TASKS), medmo)
            wait_for_instances(pacs, cr_study_id, 2 + 2 * len(TASKS), medmo)
            pacs.wait_for_queue(idle, 30, "the queue empties")
            asked = task_requests(medmo.log())

        # Each image and task reached the service once: 12 requests, 12 distinct items (the router's
        # X-Request-ID is one per image and task, the same at each attempt), all answered.
        assert Counter((r["path"], r["modality"]) for r in asked) == expected_requests(1, 2)
        assert {r["status"] for r in asked} == {200}
        assert len({r["request_id"] for r in asked}) == len(asked)
        assert tasks_by_image(answers(pacs, ct_study, ct)) == {
            middle_by_position(ct).SOPInstanceUID: sorted(TASKS)
        }
        assert tasks_by_image(answers(pacs, cr_study_id, cr)) == {
            image.SOPInstanceUID: sorted(TASKS) for image in cr.datasets
        }
        no_patient_data(pacs.router_lines(), ct)
        no_patient_data(pacs.router_lines(), cr)


class Gate:
    """A stand-in for the service's front door: it answers as scripted (429 with Retry-After, 503) or
    passes the request on to the real service, and notes when each arrived. What is simulated is an
    overloaded or failing service, not the router under test."""

    def __init__(self, service_url: str, script: Callable[[int], tuple[int, dict[str, str]] | None]) -> None:
        self.arrivals: list[tuple[float, str]] = []  # (time.monotonic(), X-Request-ID)
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                gate.arrivals.append((time.monotonic(), self.headers.get("X-Request-ID", "")))
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


def test_an_overloaded_service_is_given_the_pause_it_asks_for(medmo: RunningServer, tmp_path: Path) -> None:
    # Retry-After says 2 s; the router's own first pause would be 0.2 s.
    with Gate(medmo.url, lambda n: (429, {"Retry-After": "2"}) if n == 0 else None) as front:
        cr = cr_study(("PA",))
        with orthanc(tmp_path, routing(front.url, tasks=("report",))) as pacs:
            stored = pacs.store(cr.files[0])
            wait_for_instances(pacs, stored["ParentStudy"], 2, medmo)
            pacs.wait_for_queue(idle, 30, "the queue empties")
            assert tasks_by_image(answers(pacs, stored["ParentStudy"], cr)) == {
                cr.datasets[0].SOPInstanceUID: ["report"]
            }
    (refused_at, first_id), (accepted_at, second_id) = front.arrivals
    assert accepted_at - refused_at >= 2.0
    assert first_id == second_id  # the same item, sent again


def test_a_service_that_keeps_failing_is_given_up_and_reported_with_the_series_uid_only(
    tmp_path: Path,
) -> None:
    with Gate("http://127.0.0.1:9", lambda n: (503, {})) as front:
        cr = cr_study(("PA",))
        with orthanc(tmp_path, routing(front.url, tasks=("report",), MaxAttempts=3)) as pacs:
            stored = pacs.store(cr.files[0])
            line = pacs.wait_for_line("failed for series", 30)
            assert pacs.queue()["work_pending"] == 0
            assert [i["ID"] for i in pacs.study_instances(stored["ParentStudy"])] == [stored["ID"]]
            lines = pacs.router_lines()
    assert len(front.arrivals) == 3
    assert line.endswith(f"MedMO router: report failed for series {cr.series_uid}: HTTP 503 after 3 attempts")
    no_patient_data(lines, cr)


def test_an_image_the_model_cannot_use_is_reported_at_once(medmo: RunningServer, tmp_path: Path) -> None:
    with Gate(medmo.url, lambda n: None) as front:
        too_small = cr_study(("PA",), size=16)  # the model needs 32 pixels a side
        with orthanc(tmp_path, routing(front.url, tasks=("report",))) as pacs:
            pacs.store(too_small.files[0])
            line = pacs.wait_for_line("failed for series", 30)
            assert pacs.queue()["work_pending"] == 0
    assert len(front.arrivals) == 1
    assert line.endswith(
        f"report failed for series {too_small.series_uid}: the service refused it (422 unusable_image)"
    )
