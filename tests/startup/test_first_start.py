"""A first start, for real and offline: `medmo-serve` given a hub id downloads it from a hub on loopback
(tests/startup/hub.py, the hub's own download API) through huggingface_hub, logs its progress and phases,
names them on /readyz, then serves."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.tiny_checkpoint import write_checkpoint
from bench.servers import console_script, free_port
from tests.conftest import png_bytes
from tests.startup.hub import LocalHub, running_hub

REPO = "medmo-test/tiny"
WEIGHTS = "model.safetensors"
REPLY = "No acute abnormality."
# Qwen's vocabulary: 78 MB of weights, which huggingface_hub downloads in pieces of 10 MB (a tinier file
# arrives in one piece, and a download seen in flight needs several).
QWEN_VOCAB_SIZE = 151_936


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    published = write_checkpoint(
        tmp_path_factory.mktemp("published"), reply=REPLY, vocab_size=QWEN_VOCAB_SIZE
    )
    with running_hub() as local_hub:
        local_hub.publish(REPO, published)
        yield local_hub


def hub_env(hub: LocalHub, hf_home: Path, **extra: str) -> dict[str, str]:
    """A process environment that knows the loopback hub and a cache of its own, nothing else."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "MEDMO_"))}
    return {**clean, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(hf_home), "MEDMO_MODEL": REPO, **extra}


def log_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_first_start_downloads_with_progress_names_its_phases_then_serves(
    hub: LocalHub, tmp_path: Path
) -> None:
    hub.slow[WEIGHTS] = 3.0  # in flight long enough to be seen
    probe_port, port = free_port(), free_port()
    env = hub_env(
        hub,
        tmp_path / "hf",
        MEDMO_PORT=str(port),
        MEDMO_PROBE_PORT=str(probe_port),
        MEDMO_PROGRESS_INTERVAL_S="0.25",
        MEDMO_VQA_MAX_NEW_TOKENS="4",
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [console_script("medmo-serve")], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    answers: list[tuple[int, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + 120
        while not answers or answers[-1][0] != 200:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                response = httpx.get(f"http://127.0.0.1:{probe_port}/readyz", timeout=5)
                answers.append((response.status_code, response.json()))
            except httpx.TransportError:
                pass  # the probe port opens a moment after the process starts
            time.sleep(0.05)
        answered = httpx.post(
            f"http://127.0.0.1:{port}/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": "Is this normal?"},
            timeout=60,
        )
        assert answered.status_code == 200, answered.text
        assert (answered.json()["model"], answered.json()["answer"]) == (REPO, REPLY)
    finally:
        process.kill()
        process.wait(10)
    hub.slow.clear()

    # /readyz named the download with its percentage while the weights were in flight, then was ready.
    downloading = [body for status, body in answers if status == 503 and body["status"] == "downloading"]
    assert downloading, answers
    assert all(set(body) == {"status", "progress"} for body in downloading)
    assert any(0 < body["progress"] < 100 for body in downloading), downloading
    assert [body["progress"] for body in downloading] == sorted(body["progress"] for body in downloading)
    assert answers[-1] == (200, {"status": "ready"})
    assert {body["status"] for _, body in answers} <= {
        "downloading",
        "loading",
        "warming_up",
        "starting",
        "ready",
    }

    lines = log_lines(log_path.read_text())
    startup = [line for line in lines if line["logger"] == "medmo.startup"]
    # Progress of the download as JSON lines: bytes done of the total, rate, time left, the files in flight.
    progress = [line for line in startup if line.get("phase") == "downloading" and "done" in line]
    assert len(progress) >= 3, startup
    total = sum(len(data) for data in hub.repositories[REPO].files.values())
    assert {line["total"] for line in progress} == {total}
    assert all(line["unit"] == "B" and 0 <= line["done"] <= total for line in progress)
    assert any(0 < line["percent"] < 100 and line["rate_per_s"] > 0 and "eta_s" in line for line in progress)
    weights_in_flight = [
        entry for line in progress for entry in line["in_flight"] if entry["file"] == WEIGHTS
    ]
    assert any(0 < entry["done"] < entry["total"] for entry in weights_in_flight), progress
    # Each phase: its start, then its end with its duration, in order.
    messages = [line["message"] for line in startup if "done" not in line]
    ends = [line for line in startup if "duration_s" in line]
    assert [line["phase"] for line in ends] == ["downloading", "loading", "warming_up"], messages
    assert messages[0].startswith(f"downloading {REPO} at ")
    assert all(line["duration_s"] >= 0 for line in ends)
    assert ends[0]["duration_s"] >= 2  # the slowed weights
