"""The router's senders (docker/orthanc/medmo_senders.py) against an Orthanc held in memory and a scripted
service: how a series' images and its prior's share a request's places, which tasks count as done, and
what happens to images deleted before they are sent. tests/pacs/test_orthanc.py runs the same router
inside a real Orthanc."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medmo_queue import Image, Queue, WorkItem
from medmo_routing import RouterSettings
from medmo_senders import ResourceGoneError, Router

from tests.pacs.orthanc import shipped_configuration
from tests.pacs.test_router_requests import DICOM_FILE, Received, form_parts, scripted_service, status

ROUTED = "MedMORouted"
ANSWER = DICOM_FILE + b"an SR"


class MemoryOrthanc:
    """The REST calls the router makes, answered from dictionaries: one patient's studies, series and
    instances, their metadata, and what was stored."""

    def __init__(self) -> None:
        self.studies: dict[str, dict[str, Any]] = {}
        self.series: dict[str, dict[str, Any]] = {}
        self.instances: dict[str, dict[str, Any]] = {}
        self.metadata: dict[str, str] = {}  # "/series/{id}" or "/instances/{id}" -> MedMORouted
        self.stored: list[bytes] = []
        self.lines: list[str] = []

    def add_study(self, study_id: str, study_date: str, patient_id: str = "P-1") -> None:
        self.studies[study_id] = {
            "ID": study_id,
            "MainDicomTags": {"StudyDate": study_date, "StudyTime": "101500"},
            "PatientMainDicomTags": {"PatientID": patient_id},
            "Series": [],
        }

    def add_series(
        self,
        series_id: str,
        study_id: str,
        modality: str,
        views: list[str],
        tags: dict[str, Any] | None = None,
    ) -> list[str]:
        """A projection series, one instance per view (numbered in order), each with `tags` among its
        simplified tags; its instances' IDs."""
        ids = [f"{series_id}-{number}" for number in range(1, len(views) + 1)]
        self.series[series_id] = {
            "ID": series_id,
            "IsStable": True,
            "ParentStudy": study_id,
            "MainDicomTags": {"Modality": modality, "SeriesInstanceUID": f"1.2.{len(self.series)}"},
            "Instances": ids,
        }
        self.studies[study_id]["Series"].append(series_id)
        for number, (instance_id, view) in enumerate(zip(ids, views, strict=True), start=1):
            self.instances[instance_id] = {
                "ID": instance_id,
                "ParentSeries": series_id,
                "MainDicomTags": {"InstanceNumber": str(number), "SOPInstanceUID": f"2.{instance_id}"},
                "view": view,
                "tags": tags or {},
            }
        return ids

    def get_json(self, uri: str) -> Any:
        parts = uri.split("?")[0].strip("/").split("/")
        match parts:
            case [level, resource_id, "metadata"]:
                self._exists(level, resource_id)
                routed = self.metadata.get(f"/{level}/{resource_id}")
                return {ROUTED: routed} if routed else {}
            case ["series", series_id]:
                return self._exists("series", series_id)
            case ["series", series_id, "instances"]:
                return [self.instances[i] for i in self._exists("series", series_id)["Instances"]]
            case ["studies", study_id]:
                return self._exists("studies", study_id)
            case ["studies", study_id, "series"]:
                return [self.series[s] for s in self._exists("studies", study_id)["Series"]]
            case ["instances", instance_id]:
                return self._exists("instances", instance_id)
            case ["instances", instance_id, "simplified-tags"]:
                return self._exists("instances", instance_id)["tags"]
        raise AssertionError(f"unexpected GET {uri}")

    def get_bytes(self, uri: str) -> bytes:
        match uri.strip("/").split("/"):
            case ["instances", instance_id, "file"]:
                self._exists("instances", instance_id)
                return DICOM_FILE + instance_id.encode()
            case ["instances", instance_id, "content", "0018-5101"]:
                view = self._exists("instances", instance_id)["view"]
                if not view:
                    raise ResourceGoneError(uri)  # Orthanc's answer for a tag the file lacks
                return str(view).encode()
        raise AssertionError(f"unexpected GET {uri}")

    def post_json(self, uri: str, body: Any) -> Any:
        assert uri == "/tools/find"
        query = body["Query"]
        return [
            study
            for study in self.studies.values()
            if study["PatientMainDicomTags"]["PatientID"] == query["PatientID"]
            and study["MainDicomTags"]["StudyDate"] <= query["StudyDate"].lstrip("-")
        ]

    def store(self, dicom: bytes) -> str:
        self.stored.append(dicom)
        return f"answer-{len(self.stored)}"

    def put(self, uri: str, body: str) -> None:
        resource, _, name = uri.rpartition("/metadata/")
        assert name == ROUTED
        self.metadata[resource] = body

    def log_info(self, message: str) -> None:
        self.lines.append(message)

    def log_warning(self, message: str) -> None:
        self.lines.append(message)

    def _exists(self, level: str, resource_id: str) -> Any:
        found = {"studies": self.studies, "series": self.series, "instances": self.instances}[level].get(
            resource_id
        )
        if found is None:
            raise ResourceGoneError(f"/{level}/{resource_id}")
        return found


def settings(url: str, **medmo: Any) -> RouterSettings:
    configuration = shipped_configuration()
    configuration["MedMO"].update({"Url": url, "Retry": {"FirstDelaySeconds": 0.05}, **medmo})
    return RouterSettings.from_configuration(configuration)


@contextmanager
def routing(
    pacs: MemoryOrthanc, tmp_path: Path, answers: int, **medmo: Any
) -> Iterator[tuple[Router, list[Received]]]:
    """The router running (its queue in `tmp_path`), sending to a service that answers `answers` requests
    with an SR; the requests it receives."""
    with scripted_service() as (url, replies, received):
        replies += [status(200, body=ANSWER)] * answers
        router = Router(settings(url, **medmo), pacs, Queue(str(tmp_path / "queue.sqlite")))
        router.start()
        try:
            yield router, received
        finally:
            router.stop()


def wait_until_idle(router: Router, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = router.status()
        if status["work_pending"] == 0 and status["series_to_plan"] == 0 and status["in_flight"] == 0:
            return
        assert time.monotonic() < deadline, status
        time.sleep(0.02)


def asked(received: list[Received]) -> dict[str, list[tuple[str, bytes]]]:
    """Each request's parts, by route."""
    return {request.path: form_parts(request.headers["content-type"], request.body) for request in received}


def test_the_prior_gets_the_places_the_series_leaves_and_grounding_gets_none(tmp_path: Path) -> None:
    pacs = MemoryOrthanc()
    pacs.add_study("older", "20230101")
    pacs.add_series("older-cr", "older", "CR", ["PA"])
    pacs.add_study("prior", "20240105")
    pacs.add_series("prior-cr", "prior", "CR", ["PA", "LL", "AP"])
    pacs.add_study("current", "20250312")
    pacs.add_series("current-cr", "current", "CR", ["PA", "LL", ""])
    cr = {"CR": {"Tasks": ["report", "ground"], "Prior": True}}
    with routing(pacs, tmp_path, 2, MaxImages=4, Modalities=cr) as (router, received):
        router.series_stable("current-cr")
        wait_until_idle(router)
    parts = asked(received)
    # Three of the series, then one place left for the latest prior: its middle view.
    assert parts["/report"] == [
        ("image", DICOM_FILE + b"current-cr-1"),
        ("image", DICOM_FILE + b"current-cr-2"),
        ("image", DICOM_FILE + b"current-cr-3"),
        ("image", DICOM_FILE + b"prior-cr-2"),
        ("caption", b"current, 2025-03-12, PA"),
        ("caption", b"current, 2025-03-12, LL"),
        ("caption", b"current, 2025-03-12"),  # no View Position: the study alone
        ("caption", b"prior, 2024-01-05, LL"),
    ]
    # Grounding: the series alone, by view (an image without one captioned empty, its place kept).
    assert parts["/ground"] == [
        *(("image", DICOM_FILE + f"current-cr-{n}".encode()) for n in (1, 2, 3)),
        ("caption", b"PA"),
        ("caption", b"LL"),
        ("caption", b""),
    ]
    assert any("2 to send, compared with series prior-cr" in line for line in pacs.lines)
    assert pacs.metadata == {"/series/current-cr": "ground,report"}


def test_a_patient_without_an_earlier_study_is_sent_without_a_prior(tmp_path: Path) -> None:
    pacs = MemoryOrthanc()
    pacs.add_study("current", "20250312")
    pacs.add_series("current-cr", "current", "CR", ["PA"])
    pacs.add_study("someone-else", "20240101", patient_id="P-10")
    pacs.add_series("their-cr", "someone-else", "CR", ["PA"])
    with routing(pacs, tmp_path, 1, Modalities={"CR": {"Tasks": ["report"], "Prior": True}}) as (
        router,
        received,
    ):
        router.series_stable("current-cr")
        wait_until_idle(router)
    assert asked(received)["/report"] == [("image", DICOM_FILE + b"current-cr-1"), ("caption", b"PA")]


def test_a_task_done_for_the_series_or_by_the_earlier_version_on_an_image_is_not_asked_again(
    tmp_path: Path,
) -> None:
    pacs = MemoryOrthanc()
    pacs.add_study("current", "20250312")
    pacs.add_series("current-cr", "current", "CR", ["PA", "LL"])
    pacs.metadata["/series/current-cr"] = "ground"
    pacs.metadata["/instances/current-cr-2"] = "ground:gsps"  # as the per-instance router recorded it
    with routing(pacs, tmp_path, 1, Modalities={"CR": {"Tasks": ["report", "ground", "ground:gsps"]}}) as (
        router,
        received,
    ):
        router.series_stable("current-cr")
        wait_until_idle(router)
        assert [request.path for request in received] == ["/report"]
        # Done now for the series: planned again (stored again), it sends nothing.
        router.series_stable("current-cr")
        wait_until_idle(router)
    assert len(received) == 1
    assert pacs.metadata["/series/current-cr"] == "ground,report"
    assert [line.split(": ", 1)[1] for line in pacs.lines if "(CR)" in line] == [
        "series current-cr (CR): 1 to send",
        "series current-cr (CR): 0 to send",
    ]


def test_images_deleted_before_they_are_sent_are_left_out_and_a_series_gone_is_dropped(
    tmp_path: Path,
) -> None:
    pacs = MemoryOrthanc()
    pacs.add_study("current", "20250312")
    pacs.add_series("current-cr", "current", "CR", ["PA", "LL"])
    queue = Queue(str(tmp_path / "queue.sqlite"))
    current = (Image("current-cr-1", "PA"), Image("current-cr-2", "LL"))
    queue.series_stable("current-cr", now=0.0)
    queue.planned(
        "current-cr",
        [
            WorkItem(
                "current-cr", "report", "1.2.0", current, (Image("deleted-prior-1", "prior, 2024-01-05"),)
            ),
            WorkItem("gone-series", "ground", "1.2.9", (Image("gone-1"),)),
        ],
        now=0.0,
        events=queue.series_events("current-cr"),
    )
    queue.close()
    with routing(pacs, tmp_path, 1, Modalities={"CR": {"Tasks": ["report", "ground"]}}) as (router, received):
        wait_until_idle(router)
    assert [request.path for request in received] == ["/report"], "\n".join(pacs.lines)
    assert [name for name, _ in asked(received)["/report"]] == ["image", "image", "caption", "caption"]
    assert "ground of series gone-series: deleted, dropped" in " ".join(pacs.lines)


def test_each_series_is_sent_with_its_studys_priority_or_its_modalitys(tmp_path: Path) -> None:
    pacs = MemoryOrthanc()
    pacs.add_study("emergency", "20250312")
    pacs.add_series("trauma-cr", "emergency", "CR", ["PA"], {"RequestedProcedurePriority": "STAT"})
    pacs.add_study("ward", "20250312", patient_id="P-2")
    ordered = {"RequestAttributesSequence": [{"RequestedProcedurePriority": "HIGH"}]}
    pacs.add_series("ward-cr", "ward", "CR", ["PA"], ordered)
    pacs.add_study("clinic", "20250312", patient_id="P-3")
    pacs.add_series("clinic-cr", "clinic", "CR", ["PA"])
    pacs.add_series("clinic-mr", "clinic", "MR", ["AX"], {"RequestedProcedurePriority": "ROUTINE"})
    modalities = {"CR": {"Tasks": ["report"]}, "MR": {"Tasks": ["report"], "Priority": "urgent"}}
    with routing(pacs, tmp_path, 4, Modalities=modalities) as (router, received):
        for series in ("trauma-cr", "ward-cr", "clinic-cr", "clinic-mr"):
            router.series_stable(series)
        wait_until_idle(router)
    sent = {
        form_parts(request.headers["content-type"], request.body)[0][1].removeprefix(DICOM_FILE).decode(): (
            request.headers["x-priority"]
        )
        for request in received
    }
    assert sent == {
        "trauma-cr-1": "stat",
        "ward-cr-1": "urgent",
        "clinic-cr-1": "routine",
        "clinic-mr-1": "urgent",
    }
