"""/preview comes in by the same door as a task: a flood of large previews is refused once the queue is
full, holds memory within a bound, and never keeps a request for the model waiting."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from bench.servers import RunningServer, serve
from tests.api.test_hostile_inputs import peak_rss_since_reset, reset_peak_rss
from tests.conftest import png_bytes
from tests.corpus import MIB

FLOOD = 24
SIDE = 6000  # 36 megapixels each
QUEUE = 8
# Two previews decode at once (half the four preparation threads), each a 36-megapixel picture in 8-bit
# RGB (108 MB) with its grayscale source and its PNG (about 600 MiB measured for the two); before previews
# were admitted, 24 of them took 4.2 GB.
MEMORY_BOUND = 800 * MIB


@pytest.fixture(scope="module")
def server(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    env = {"MEDMO_MAX_QUEUE": str(QUEUE), "MEDMO_VQA_MAX_NEW_TOKENS": "2"}
    with serve(random_checkpoint, tmp_path_factory.mktemp("previews") / "server.log", env=env) as running:
        yield running


def large_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (SIDE, SIDE), 90).save(buffer, format="PNG")
    return buffer.getvalue()  # kilobytes, which decode to 36 million pixels


def test_a_flood_of_large_previews_is_admitted_like_tasks_and_a_request_beside_it_is_answered(
    server: RunningServer,
) -> None:
    process = psutil.Process(server.process.pid)
    upload = large_png()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        assert (
            client.post("/preview", files={"image": ("small.png", png_bytes(), "image/png")}).status_code
            == 200
        )
        idle = process.memory_info().rss
        reset_peak_rss(process.pid)

        def preview(_: int) -> int:
            return client.post("/preview", files={"image": ("large.png", upload, "image/png")}).status_code

        with ThreadPoolExecutor(FLOOD) as senders:
            flood = [senders.submit(preview, n) for n in range(FLOOD)]
            time.sleep(0.5)  # the flood is in
            began = time.monotonic()
            beside = client.post(
                "/vqa",
                files={"image": ("scan.png", png_bytes(), "image/png")},
                data={"question": "Is it normal?"},
                headers={"X-Request-Timeout": "30"},
            )
            answered_s = time.monotonic() - began
            statuses = [future.result() for future in flood]
        peak_over_idle = peak_rss_since_reset(process.pid) - idle
        metrics = client.get("/metrics").text
    print(
        f"statuses {sorted(statuses)}; /vqa beside them in {answered_s:.1f} s; peak {peak_over_idle / MIB:.0f} MiB"
    )
    assert beside.status_code == 200, beside.text
    assert set(statuses) == {200, 429}  # refused once the queue was full, the others served
    assert statuses.count(200) >= QUEUE // 2  # previews may hold half the queue's places
    assert 0 < peak_over_idle < MEMORY_BOUND
    assert 'medmo_requests_total{status="429",task="preview"}' in metrics
