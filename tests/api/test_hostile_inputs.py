"""A corpus of malformed and hostile requests against a real server process.

Every case must get the documented 4xx it is listed with, in the error shape; never a 500, never a hang;
`/healthz` answers 200 after every case. The bombs (deflate, compressed pixel data, PNG and palette
expansion) run while the server's peak resident memory is watched: it must stay within MEMORY_BOUND of
its level before them. The server runs with a pixel limit of 4 Mpx (MEDMO_MAX_IMAGE_PIXELS) and the
default 64 MiB upload limit, so the bound covers decoding the largest image that limit allows as well.
"""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from bench.servers import RunningServer, serve
from tests.api.hostile_requests import (
    CASES,
    MAX_IMAGE_PIXELS,
    Case,
    dicom_cases,
    image_cases,
    json_cases,
    multipart_cases,
    query_cases,
)
from tests.corpus import MIB, synthetic_ct

MEMORY_BOUND = 300 * MIB
CASE_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def hostile_server(
    random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = {
        "MEDMO_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "MEDMO_MIN_PIXELS": str(32 * 32),
        "MEDMO_MAX_PIXELS": str(128 * 128),  # what the model sees: small, so the 200s are quick
        "MEDMO_VQA_MAX_NEW_TOKENS": "2",
        "MEDMO_REPORT_MAX_NEW_TOKENS": "2",
        "MEDMO_GROUND_MAX_NEW_TOKENS": "2",
        "MEDMO_CHAT_MAX_NEW_TOKENS": "2",
        "MEDMO_MAX_CONTEXT": "1024",
        # Room for one image at the pixel limit, not two.
        "MEDMO_MAX_TOTAL_PIXELS": str(MAX_IMAGE_PIXELS * 3 // 2),
    }
    with serve(random_checkpoint, tmp_path_factory.mktemp("hostile") / "server.log", env=env) as server:
        yield server


def send(client: httpx.Client, case: Case) -> httpx.Response:
    if case.declared_length is not None:
        return send_declaring_length(str(client.base_url), case)
    return client.post(
        case.path,
        files=case.files,
        data=case.data,
        content=case.content,
        params=case.params,
        headers=case.headers,
        timeout=CASE_TIMEOUT_S,
    )


def send_declaring_length(base_url: str, case: Case) -> httpx.Response:
    """httpx will not send a Content-Length its body does not match; http.client sends what it is told."""
    url = httpx.URL(base_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=CASE_TIMEOUT_S)
    try:
        connection.putrequest("POST", case.path)
        for name, value in {**case.headers, "content-length": str(case.declared_length)}.items():
            connection.putheader(name, value)
        connection.endheaders(case.content)
        answer = connection.getresponse()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    finally:
        connection.close()


def peak_rss_since_reset(pid: int) -> int:
    """VmHWM, the process's peak resident memory since the last reset, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak resident set size to the current one


def test_the_corpus_is_large_in_every_part() -> None:
    parts = [image_cases(), multipart_cases(), json_cases(), query_cases(), dicom_cases()]
    assert [len(part) >= 10 for part in parts] == [True] * 5
    assert len(CASES) == sum(len(part) for part in parts) >= 100
    assert len({case.name for case in CASES}) == len(CASES)
    assert sum(case.bomb for case in CASES) >= 10


def test_every_hostile_request_gets_its_documented_status(hostile_server: RunningServer) -> None:
    process = psutil.Process(hostile_server.process.pid)
    failures: list[str] = []
    with httpx.Client(base_url=hostile_server.url) as client:
        # Warm up the paths the bombs take (imports, first allocations) before measuring the idle level.
        for case in CASES:
            if case.status == 200:
                send(client, case)  # checked with the others below
        idle_rss = process.memory_info().rss
        reset_peak_rss(process.pid)
        peak_over_idle = 0
        for case in sorted(CASES, key=lambda case: not case.bomb):
            started = time.monotonic()
            response = send(client, case)
            elapsed = time.monotonic() - started
            if case.bomb:
                peak_over_idle = max(peak_over_idle, peak_rss_since_reset(process.pid) - idle_rss)
            problem = check(case, response, elapsed)
            if problem:
                failures.append(f"{case.name}: {problem}")
            health = client.get("/healthz", timeout=5)
            assert health.status_code == 200, f"/healthz answered {health.status_code} after {case.name}"
    print(f"peak resident memory over idle during the bombs: {peak_over_idle / MIB:.0f} MiB")
    assert not failures, "\n".join(failures)
    assert 0 < peak_over_idle < MEMORY_BOUND, f"peak {peak_over_idle / MIB:.0f} MiB over idle"
    log = hostile_server.log()
    assert "internal_error" not in log
    # Reports were built (highdicom logs the source's UIDs while it does) and inputs quoted patient
    # data; none of it reaches the log.
    source = synthetic_ct()
    for planted in ("Corpus^Case", "CORPUS-1", source.StudyInstanceUID, source.SOPInstanceUID, "Jane Doe"):
        assert planted not in log


def check(case: Case, response: httpx.Response, elapsed_s: float) -> str | None:
    if response.status_code != case.status:
        return f"{response.status_code} instead of {case.status}: {response.text[:300]}"
    if elapsed_s > CASE_TIMEOUT_S / 2:
        return f"took {elapsed_s:.1f} s"
    if case.status == 200:
        return None
    if response.headers.get("content-type") != "application/json":
        return f"content type {response.headers.get('content-type')}"
    error = response.json().get("error", {})
    if set(error) != {"code", "message", "request_id"} or not error["message"]:
        return f"not the error shape: {response.text[:300]}"
    return None
