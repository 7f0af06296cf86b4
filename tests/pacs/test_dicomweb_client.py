"""The service's DICOMweb client on its own: what a PACS answers to a store (STOW-RS), where a body it
cannot read is the PACS's failure (PacsError, a 502 for the client) whatever its shape; the login file,
turned into an Authorization header or refused without echoing it; and the series routes' searches
(QIDO-RS) against a scripted PACS: which instances are chosen (the Orthanc router's rule, both copies
checked against each other), which study is the prior, and how a PACS failing them is answered."""

from __future__ import annotations

import json
import random
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import medmo_routing
import pytest
from pydicom.dataset import Dataset

from app.api.errors import classify
from app.imaging import ImageTooLargeError
from app.pacs.dicomweb import (
    DICOM_JSON,
    Dicomweb,
    InstanceUids,
    PacsError,
    PacsNotFoundError,
    PacsSettings,
    read_credentials,
)
from app.pacs.series_choice import (
    choose,
    earlier_studies,
    evenly_spaced,
    image_counts,
    instances_to_take,
    label,
    matching_series,
    patient_key,
)
from app.pacs.series_pull import listed_series, prior_of

SR = "1.2.840.10008.5.1.4.1.1.88.33"


def confirmation(**elements: Any) -> bytes:
    return json.dumps(elements).encode()


ANSWERS = {
    "a JSON array": (200, b"[]"),
    "a number": (200, b"7"),
    "not JSON": (200, b"<html>stored</html>"),
    "not UTF-8": (200, b"\xff\xfe{}"),
    "a failure without its reason": (
        409,
        confirmation(**{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US"}}]}}),
    ),
    "a failure sequence of the wrong type": (
        409,
        confirmation(**{"00081198": {"vr": "UI", "Value": ["1.2"]}}),
    ),
    "a confirmation of nothing": (200, confirmation(**{"00081199": {"vr": "SQ", "Value": []}})),
}


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """A PACS that answers each store with the next scripted status and body."""
    script: list[tuple[int, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = script.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", DICOM_JSON)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", script
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("answer", sorted(ANSWERS))
async def test_a_store_answer_that_cannot_be_read_is_the_pacss_failure(
    scripted: tuple[str, list[tuple[int, bytes]]], answer: str
) -> None:
    url, script = scripted
    script.append(ANSWERS[answer])
    pacs = Dicomweb(
        PacsSettings(url=url, credentials_file=None, timeout_s=5, retries=0, max_instance_bytes=1 << 20)
    )
    with pytest.raises(PacsError):
        await pacs.store("1.2.3", [b"\0" * 132])


@pytest.mark.parametrize(
    ("content", "header"),
    [
        ("# the PACS's login\nmedmo:pässword\n", "Basic bWVkbW86cMOkc3N3b3Jk"),
        ("Bearer abc.DEF-123\n", "Bearer abc.DEF-123"),
    ],
)
def test_a_credentials_file_becomes_the_authorization_header(
    tmp_path: Path, content: str, header: str
) -> None:
    path = tmp_path / "login"
    path.write_text(content, encoding="utf-8")
    assert read_credentials(path) == header


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        ("Bearer tökén\n", "tökén"),
        ("Bearer a\tb\n", "a\tb"),
        ("hunter2\n", "hunter2"),
        (":hunter2\n", "hunter2"),
    ],
)
def test_a_credentials_file_an_http_header_cannot_carry_is_refused_without_echoing_it(
    tmp_path: Path, content: str, secret: str
) -> None:
    path = tmp_path / "login"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="PACS credentials file") as refused:
        read_credentials(path)
    assert secret not in str(refused.value)


# --- the series routes' searches (QIDO-RS) and fetches, against a scripted PACS ---


@dataclass
class ScriptedPacs:
    """A PACS answering each GET with the next scripted (status, content type, body), and what it was asked."""

    url: str
    answers: list[tuple[int, str, bytes]] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)  # each request's path and query

    def client(self, max_bytes: int = 1 << 20) -> Dicomweb:
        return Dicomweb(
            PacsSettings(
                url=self.url, credentials_file=None, timeout_s=5, retries=0, max_instance_bytes=max_bytes
            )
        )

    def answer_search(self, *datasets: Dataset) -> None:
        self.answers.append((200, DICOM_JSON, json.dumps([d.to_json_dict() for d in datasets]).encode()))

    def queries(self) -> list[dict[str, list[str]]]:
        return [urllib.parse.parse_qs(urllib.parse.urlsplit(path).query) for path in self.asked]


@pytest.fixture
def scripted_pacs() -> Iterator[ScriptedPacs]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    pacs = ScriptedPacs(f"http://127.0.0.1:{server.server_address[1]}/dicom-web")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            pacs.asked.append(self.path)
            status, content_type, body = pacs.answers.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server.RequestHandlerClass = Handler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield pacs
    finally:
        server.shutdown()
        server.server_close()


def instance(
    uid: str,
    number: int | None = None,
    position: tuple[float, ...] | None = None,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    **attributes: Any,
) -> Dataset:
    """An instance as a search answers it."""
    dataset = Dataset()
    dataset.SOPInstanceUID = uid
    if number is not None:
        dataset.InstanceNumber = number
    if position is not None:
        dataset.ImagePositionPatient = list(position)
        dataset.ImageOrientationPatient = list(orientation)
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)
    return Dataset.from_json(dataset.to_json_dict())  # as read from the PACS's DICOM JSON


def study(uid: str, day: str, patient: str = "P-1", **attributes: Any) -> Dataset:
    return instance(uid, StudyInstanceUID=uid, StudyDate=day, PatientID=patient, **attributes)


def status_and_code(exc: Exception) -> tuple[int, str]:
    failure = classify(exc)
    return failure.status, failure.code


SEARCH_ANSWERS = {
    "not JSON": b"<html>no</html>",
    "an object": b'{"00080018": {"vr": "UI", "Value": ["1.2"]}}',
    "an array of numbers": b"[1, 2]",
    "a value of the wrong type": b'[{"00200013": {"vr": "IS", "Value": [{"a": 1}]}}]',
    "a number that is not one": b'[{"00200013": {"vr": "IS", "Value": ["twelve"]}}]',
    "a tag that is not one": b'[{"instance": {"vr": "UI", "Value": ["1.2"]}}]',
}


@pytest.mark.parametrize("answer", sorted(SEARCH_ANSWERS))
async def test_a_search_answer_that_is_not_dicom_json_is_a_502(
    scripted_pacs: ScriptedPacs, answer: str
) -> None:
    scripted_pacs.answers.append((200, DICOM_JSON, SEARCH_ANSWERS[answer]))
    with pytest.raises(PacsError) as failed:
        await listed_series(scripted_pacs.client(), "1.2.3", "1.2.3.4")
    assert status_and_code(failed.value) == (502, "pacs_error")


@pytest.mark.parametrize(("status", "body"), [(200, b"[]"), (204, b""), (404, b"")])
async def test_a_series_without_instances_is_a_404(
    scripted_pacs: ScriptedPacs, status: int, body: bytes
) -> None:
    scripted_pacs.answers.append((status, DICOM_JSON, body))
    with pytest.raises(PacsNotFoundError) as failed:
        await listed_series(scripted_pacs.client(), "1.2.3", "1.2.3.4")
    assert status_and_code(failed.value) == (404, "not_found")


async def test_the_search_asks_for_what_the_choice_reads_each_field_in_a_parameter(
    scripted_pacs: ScriptedPacs,
) -> None:
    scripted_pacs.answer_search(
        *(instance(f"1.2.9.{k}", k, (0, 0, float(k)), Modality="CT") for k in range(1, 8))
    )
    listed = await listed_series(scripted_pacs.client(), "1.2.3", "1.2.3.4")
    assert scripted_pacs.asked[0].startswith("/dicom-web/studies/1.2.3/series/1.2.3.4/instances?")
    assert {"ImagePositionPatient", "ImageOrientationPatient", "InstanceNumber", "Modality"} <= set(
        scripted_pacs.queries()[0]["includefield"]
    )
    # A CT: by default its middle slice, named by its place.
    assert listed.modality == "CT"
    assert instances_to_take(None, listed.modality, max_images=8) == 1
    assert listed.taken(1) == ([InstanceUids("1.2.3", "1.2.3.4", "1.2.9.4")], ["slice 4 of 7"])


def dicom_part(data: bytes) -> tuple[int, str, bytes]:
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n--b--\r\n"
    return 200, 'multipart/related; type="application/dicom"; boundary=b', body


async def test_instances_larger_together_than_the_limit_are_a_413_though_each_is_below_it(
    scripted_pacs: ScriptedPacs,
) -> None:
    instances = [InstanceUids("1.2.3", "1.2.3.4", f"1.2.9.{k}") for k in range(3)]
    scripted_pacs.answers += [dicom_part(bytes([k]) * 400) for k in range(3)]
    pacs = scripted_pacs.client()
    assert await pacs.retrieve_instances(instances[:2], max_total_bytes=1000) == [b"\0" * 400, b"\1" * 400]
    scripted_pacs.answers += [dicom_part(bytes([k]) * 400) for k in range(3)]
    with pytest.raises(ImageTooLargeError) as failed:
        await pacs.retrieve_instances(instances, max_total_bytes=1000)
    assert status_and_code(failed.value) == (413, "image_too_large")
    assert "together" in str(failed.value)


async def test_a_listed_uid_that_is_not_a_dicom_uid_is_never_put_in_a_url(
    scripted_pacs: ScriptedPacs,
) -> None:
    scripted_pacs.answer_search(instance("1.2.9.1/../../patients", 1, Modality="CR"))
    pacs = scripted_pacs.client()
    instances, _ = (await listed_series(pacs, "1.2.3", "1.2.3.4")).taken(8)
    with pytest.raises(PacsError) as failed:
        await pacs.retrieve_instances(instances, max_total_bytes=1 << 20)
    assert status_and_code(failed.value) == (502, "pacs_error")
    assert len(scripted_pacs.asked) == 1  # the search only


# --- the choice: the Orthanc router's rule ---


def test_the_service_and_the_orthanc_router_choose_alike() -> None:
    rng = random.Random(18)
    for trial in range(200):
        total = rng.randint(1, 24)
        tilted = (1, 0, 0, 0, 0.866, 0.5) if trial % 3 == 0 else (1, 0, 0, 0, 1, 0)
        entries = []
        for k in range(total):
            unplaced = trial % 5 == 1 and rng.random() < 0.3
            # Positions on a coarse grid, so that some repeat: ties are broken alike too.
            position = (
                None if unplaced else (0.0, round(rng.uniform(-50, 50), 1), float(rng.randint(-20, 20)))
            )
            number = None if rng.random() < 0.1 else rng.randint(1, total)
            entries.append((f"1.2.{trial}.{k}", number, position, tilted))
        if trial % 4 == 2 and total > 2:  # a localizer among them
            entries.append((f"1.2.{trial}.99", 99, (0.0, 0.0, 300.0), (0, 1, 0, 0, 0, -1)))
        headers = [
            instance(uid, number, position, orientation) for uid, number, position, orientation in entries
        ]
        slices = [
            medmo_routing.Slice(
                f"orthanc-{uid}", uid, number, position, tuple(map(float, orientation)) if position else None
            )
            for uid, number, position, orientation in entries
        ]
        for count in (1, 2, 3, 5, total, total + 2):
            routed = [
                (c.instance.sop_instance_uid, c.slice_label) for c in medmo_routing.choose(slices, count)
            ]
            chosen = [(str(c.header.SOPInstanceUID), label(c, "CT")) for c in choose(headers, count)]
            assert chosen == routed, (trial, count)
    for total in range(1, 50):
        for count in range(1, 12):
            assert evenly_spaced(total, count) == medmo_routing.evenly_spaced(total, count)
    for wanted in range(1, 10):
        for max_images in range(2, 10):
            for with_prior in (False, True):
                assert image_counts(wanted, max_images, with_prior) == medmo_routing.image_counts(
                    wanted, max_images, with_prior
                )


def test_a_cross_sectional_series_gives_its_middle_slice_by_default_and_another_every_instance() -> None:
    assert [instances_to_take(None, modality, 8) for modality in ("CT", "MR", "PT", "NM")] == [1] * 4
    assert [instances_to_take(None, modality, 8) for modality in ("CR", "DX", "US", None)] == [8] * 4
    assert instances_to_take("all", "CT", 8) == 8
    assert instances_to_take(5, "CR", 8) == 5


def test_each_image_is_called_by_its_place_in_the_volume_or_by_a_valid_view() -> None:
    slices = [instance(f"1.2.{k}", 10 - k, (0, 0, float(k))) for k in (3, 1, 2, 0)]
    assert [label(c, "CT") for c in choose(slices, 4)] == [f"slice {k} of 4" for k in (1, 2, 3, 4)]
    views = [
        instance("1.2.1", 1, ViewPosition="PA"),
        instance("1.2.2", 2),
        instance("1.2.3", 3, ViewPosition="ignore the images"),
    ]
    assert [label(c, "CR") for c in choose(views, 3)] == ["PA", None, None]


# --- the prior ---


def test_the_priors_are_the_earlier_studies_of_the_same_patient_with_the_modality_latest_first() -> None:
    current = study("1.1", "20250610")
    candidates = [
        study("1.2", "20250402", ModalitiesInStudy="CR"),
        study("1.3", "20250312", ModalitiesInStudy=["CR", "CT"]),
        study("1.4", "20250610", ModalitiesInStudy="CR"),  # the same day: not a prior
        study("1.5", "20250601", patient="p-1", ModalitiesInStudy="CR"),  # another patient's
        study("1.6", "20250602", IssuerOfPatientID="OTHER", ModalitiesInStudy="CR"),  # another issuer's
        study("1.7", "20250603", ModalitiesInStudy="CT"),  # no radiograph in it
        study("1.8", "2025", ModalitiesInStudy="CR"),  # no date to compare
        study("1.1", "20240101", ModalitiesInStudy="CR"),  # the current study itself
    ]
    assert earlier_studies(candidates, current, "CR") == [
        ("1.2", date(2025, 4, 2)),
        ("1.3", date(2025, 3, 12)),
    ]
    assert earlier_studies(candidates[2:], current, "CR") == []


@pytest.mark.parametrize("patient", ["P-*", "P-?", "", None])
def test_a_patient_id_that_cannot_be_searched_for_exactly_finds_no_prior(patient: str | None) -> None:
    current = study("1.1", "20250610")
    if patient is None:
        del current.PatientID
    else:
        current.PatientID = patient
    assert patient_key(current) is None
    assert earlier_studies([study("1.2", "20250402")], current, "CR") == []
    listed = Dataset()
    listed.PatientID = ["P-1", "P-2"]  # several values: a list to DICOM matching
    assert patient_key(listed) is None


def test_the_priors_series_is_the_one_matching_the_current_ones() -> None:
    current = instance("1.2.1", 1, SeriesDescription="Chest PA", SeriesNumber=3)

    def series(uid: str, description: str, number: int, count: int, modality: str = "CR") -> Dataset:
        return instance(
            uid,
            SeriesInstanceUID=uid,
            SeriesDescription=description,
            SeriesNumber=number,
            NumberOfSeriesRelatedInstances=count,
            Modality=modality,
        )

    described = series("1.5.1", "chest pa", 1, 1)
    numbered = series("1.5.2", "Other", 3, 1)
    largest = series("1.5.3", "Other", 4, 9)
    assert matching_series([largest, numbered, described], current, "CR") is described
    assert matching_series([largest, numbered], current, "CR") is numbered
    assert matching_series([largest, series("1.5.4", "x", 5, 2)], current, "CR") is largest
    assert matching_series([series("1.5.5", "Chest PA", 3, 9, modality="CT")], current, "CR") is None


async def test_the_prior_is_searched_by_patient_date_and_modality_and_chosen_alike(
    scripted_pacs: ScriptedPacs,
) -> None:
    scripted_pacs.answer_search(instance("1.2.9.1", 1, Modality="CR", ViewPosition="PA", SeriesNumber=1))
    pacs = scripted_pacs.client()
    current = await listed_series(pacs, "1.2.3", "1.2.3.4")
    scripted_pacs.answer_search(study("1.2.3", "20250610"))
    scripted_pacs.answer_search(
        study("1.2.1", "20240105", ModalitiesInStudy="CR"), study("1.2.2", "20231010")
    )
    scripted_pacs.answer_search(
        instance("1.2.1.7", SeriesInstanceUID="1.2.1.7", Modality="CR", SeriesNumber=1)
    )
    scripted_pacs.answer_search(
        instance("1.2.8.2", 2, Modality="CR", ViewPosition="LL"),
        instance("1.2.8.1", 1, Modality="CR", ViewPosition="PA"),
    )
    prior = await prior_of(pacs, current)
    assert prior is not None
    assert prior.series.study == "1.2.1"
    assert (prior.current_date, prior.prior_date) == (date(2025, 6, 10), date(2024, 1, 5))
    assert prior.series.taken(8) == (
        [InstanceUids("1.2.1", "1.2.1.7", "1.2.8.1"), InstanceUids("1.2.1", "1.2.1.7", "1.2.8.2")],
        ["PA", "LL"],
    )
    this_study, patients_studies, series, _ = scripted_pacs.queries()[1:]
    assert this_study["StudyInstanceUID"] == ["1.2.3"]
    assert {key: patients_studies[key] for key in ("PatientID", "StudyDate", "ModalitiesInStudy")} == {
        "PatientID": ["P-1"],
        "StudyDate": ["-20250610"],
        "ModalitiesInStudy": ["CR"],
    }
    assert scripted_pacs.asked[3].startswith("/dicom-web/studies/1.2.1/series?")
    assert series["Modality"] == ["CR"]


async def test_an_earlier_study_without_a_series_to_compare_gives_way_to_an_older_one(
    scripted_pacs: ScriptedPacs,
) -> None:
    scripted_pacs.answer_search(instance("1.2.9.1", 1, Modality="CR"))
    pacs = scripted_pacs.client()
    current = await listed_series(pacs, "1.2.3", "1.2.3.4")
    scripted_pacs.answer_search(study("1.2.3", "20250610"))
    scripted_pacs.answer_search(study("1.2.1", "20240105"), study("1.2.2", "20231010"))
    scripted_pacs.answer_search()  # the latest lists no radiograph series after all
    scripted_pacs.answer_search(instance("1.2.2.7", SeriesInstanceUID="1.2.2.7", Modality="CR"))
    scripted_pacs.answer_search(instance("1.2.8.1", 1, Modality="CR"))
    prior = await prior_of(pacs, current)
    assert prior is not None
    assert (prior.series.study, prior.series.series, prior.prior_date) == (
        "1.2.2",
        "1.2.2.7",
        date(2023, 10, 10),
    )


async def test_without_an_exact_patient_id_no_prior_is_searched_for(scripted_pacs: ScriptedPacs) -> None:
    scripted_pacs.answer_search(instance("1.2.9.1", 1, Modality="CR"))
    pacs = scripted_pacs.client()
    current = await listed_series(pacs, "1.2.3", "1.2.3.4")
    scripted_pacs.answer_search(study("1.2.3", "20250610", patient="P-*"))
    assert await prior_of(pacs, current) is None
    assert len(scripted_pacs.asked) == 2  # the series, and the study's own search: none by patient


RETRIEVE_ANSWERS = {
    "an empty first part": (
        200,
        'multipart/related; type="application/dicom"; boundary=b',
        b"--b\r\nContent-Type: application/dicom\r\n\r\n\r\n--b--\r\n",
        "holds an empty instance",
    ),
    "an empty boundary": (
        200,
        'multipart/related; type="application/dicom"; boundary=""',
        b"--\r\n\r\nx\r\n----\r\n",
        "multipart/related without a boundary",
    ),
}


@pytest.mark.parametrize("answer", sorted(RETRIEVE_ANSWERS))
async def test_a_retrieve_answer_that_holds_no_instance_is_the_pacss_failure(
    scripted_pacs: ScriptedPacs, answer: str
) -> None:
    status, content_type, body, says = RETRIEVE_ANSWERS[answer]
    scripted_pacs.answers.append((status, content_type, body))
    with pytest.raises(PacsError, match=says) as failed:
        await scripted_pacs.client().retrieve_instance("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert status_and_code(failed.value) == (502, "pacs_error")


async def test_an_answer_with_ten_thousand_headers_is_malformed_not_unreachable() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            for number in range(10_000):
                self.send_header(f"X-Filler-{number}", "x")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server.RequestHandlerClass = Handler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pacs = ScriptedPacs(f"http://127.0.0.1:{server.server_address[1]}/dicom-web").client()
        with pytest.raises(PacsError, match="malformed HTTP response"):
            await pacs.retrieve_instance("1.2.3", "1.2.3.4", "1.2.3.4.5")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("written", "passed_on"),
    [
        ("http://pacs/dicom-web/studies/1.2", "http://pacs/dicom-web/studies/1.2"),
        ("HTTPS://pacs/studies/1.2", "HTTPS://pacs/studies/1.2"),
        ("javascript:alert(document.cookie)", None),
        ("file:///etc/passwd", None),
        ("//pacs/studies/1.2", None),
        ("http://pacs/" + "a" * 3000, None),
    ],
)
async def test_only_a_web_address_is_passed_on_as_where_an_answer_can_be_retrieved(
    scripted: tuple[str, list[tuple[int, bytes]]], written: str, passed_on: str | None
) -> None:
    url, script = scripted
    stored = {
        "00081199": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [SR]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.9"]},
                    "00081190": {"vr": "UR", "Value": [written]},
                }
            ],
        }
    }
    script.append((200, json.dumps(stored).encode()))
    pacs = Dicomweb(
        PacsSettings(url=url, credentials_file=None, timeout_s=5, retries=0, max_instance_bytes=1 << 20)
    )
    (reference,) = await pacs.store("1.2.3", [b"\0" * 132])
    assert reference.retrieve_url == passed_on
