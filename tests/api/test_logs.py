"""Patient data, request content and keys never reach the logs, at any level, on any path."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import httpx
import pydicom

from bench.servers import RunningServer
from tests.conftest import LIVE_API_KEY, png_bytes, pydicom_file

PATIENT_NAME = "Canaryhaus^Wilhelmina^Quillon"
PATIENT_ID = "MRN-CANARY-559182"
ACCESSION = "ACC-CANARY-31337"
QUESTION = "Is the quillonic canary effusion in Wilhelmina visible?"
WRONG_KEY = "canary-wrong-key-that-was-presented-0042"
CANARIES = [
    PATIENT_NAME,
    "Canaryhaus",
    "Wilhelmina",
    PATIENT_ID,
    ACCESSION,
    "quillonic",
    LIVE_API_KEY,
    WRONG_KEY,
]


def planted_dicom() -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(pydicom_file("CT_small.dcm")))
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.AccessionNumber = ACCESSION
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def exercise_every_path(url: str) -> dict[str, int]:
    """Successes and every error path, each carrying the canaries somewhere a careless log would write them."""
    dicom = planted_dicom()
    good = {"X-API-Key": LIVE_API_KEY}
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=60) as client:

        def send(name: str, method: str, path: str, **kwargs: object) -> None:
            statuses[name] = client.request(method, path, **kwargs).status_code  # type: ignore[arg-type]

        files = {"image": ("scan.dcm", dicom, "application/dicom")}
        send("vqa", "POST", "/vqa", files=files, data={"question": QUESTION}, headers=good)
        send("report", "POST", "/report", files=files, data={"indication": QUESTION}, headers=good)
        send("ground", "POST", "/ground", files=files, data={"target": QUESTION}, headers=good)
        send("sr", "POST", "/report", files=files, headers={**good, "Accept": "application/dicom"})
        send(
            "raw",
            "POST",
            "/vqa",
            params={"question": QUESTION},
            content=dicom,
            headers={**good, "content-type": "application/dicom"},
        )
        send(
            "json",
            "POST",
            "/vqa",
            json={"image": base64.b64encode(dicom).decode(), "question": QUESTION},
            headers=good,
        )
        send(
            "401 wrong key",
            "POST",
            "/vqa",
            files=files,
            data={"question": QUESTION},
            headers={"Authorization": f"Bearer {WRONG_KEY}"},
        )
        send("401 no key", "POST", "/vqa", files=files, data={"question": QUESTION})
        send(
            "400 unreadable",
            "POST",
            "/vqa",
            files={"image": ("a.png", QUESTION.encode(), "image/png")},
            data={"question": QUESTION},
            headers=good,
        )
        send(
            "400 bad json",
            "POST",
            "/vqa",
            content=b'{"question": "' + QUESTION.encode(),
            headers={**good, "content-type": "application/json"},
        )
        send(
            "406",
            "POST",
            "/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": QUESTION},
            headers={**good, "Accept": "application/dicom"},
        )
        send("415", "POST", "/vqa", content=QUESTION.encode(), headers={**good, "content-type": "text/plain"})
        send("422 long", "POST", "/vqa", files=files, data={"question": QUESTION * 100}, headers=good)
        send("422 field", "POST", "/vqa", files=files, data={"question": "q", "note": QUESTION}, headers=good)
        send(
            "422 frame", "POST", "/vqa", files=files, data={"question": QUESTION, "frame": "7"}, headers=good
        )
        send("404", "GET", f"/patients/{PATIENT_ID}", headers=good)
        send("405", "GET", "/vqa", params={"question": QUESTION}, headers=good)
    statuses["413"] = declared_too_large(url, QUESTION.encode())
    return statuses


def declared_too_large(url: str, body: bytes) -> int:
    """A body announcing 100 GB: refused from its headers. httpx will not send a lying Content-Length."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /vqa HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {LIVE_API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10**11}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head.encode() + body)
        status_line = connection.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def test_canaries_reach_no_log_line_of_a_real_server(live_server: RunningServer) -> None:
    # The live server logs at debug, the most verbose level, to a file: whatever any logger writes is read.
    statuses = exercise_every_path(live_server.url)
    assert statuses == {
        "vqa": 200,
        "report": 200,
        "ground": 200,
        "sr": 200,
        "raw": 200,
        "json": 200,
        "401 wrong key": 401,
        "401 no key": 401,
        "400 unreadable": 400,
        "400 bad json": 400,
        "406": 406,
        "413": 413,
        "415": 415,
        "422 long": 422,
        "422 field": 422,
        "422 frame": 422,
        "404": 404,
        "405": 405,
    }
    time.sleep(0.2)  # let the last access lines reach the file
    log = live_server.log()
    lines = [line for line in log.splitlines() if line.strip()]
    access = [json.loads(line) for line in lines if '"logger": "medmo.access"' in line]
    assert len(access) >= len(statuses)  # every request was logged...
    assert {"request_id", "status", "latency_ms", "path"} <= set(access[-1])
    for canary in CANARIES:
        assert canary not in log, f"{canary!r} was logged"  # ...and nothing of what it carried


def test_each_access_line_is_json_with_the_request_facts(live_server: RunningServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        response = client.post(
            "/report",
            files={"image": ("scan.dcm", planted_dicom(), "application/dicom")},
            headers={"X-API-Key": LIVE_API_KEY, "X-Request-ID": "log-line-check-1"},
        )
    assert response.status_code == 200
    time.sleep(0.2)
    (line,) = [json.loads(line) for line in live_server.log().splitlines() if "log-line-check-1" in line]
    assert line["logger"] == "medmo.access"
    assert line["task"] == "report"
    assert line["status"] == 200
    assert line["path"] == "/report"
    assert line["modality"] == "CT"
    assert line["image_format"] == "DICOM"
    assert line["images"] == 1
    assert (line["image_width"], line["image_height"]) == (128, 128)
    assert line["batch_size"] == 1
    assert line["queue_ms"] >= 0
    assert line["latency_ms"] > 0
    assert set(line) <= {
        "ts",
        "level",
        "logger",
        "message",
        "request_id",
        "method",
        "path",
        "status",
        "task",
        "latency_ms",
        "queue_ms",
        "batch_size",
        "images",
        "image_width",
        "image_height",
        "image_format",
        "modality",
    }
