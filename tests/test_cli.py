"""The console scripts, run as an operator runs them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.conversation import Conversation
from app.engine.request import GenerationOptions
from app.engine.runtime import ModelRuntime
from app.settings import Settings
from bench.servers import console_script, serve
from tests.conftest import png_bytes, rgb_image


def run_serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("medmo-serve"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_configuration_is_one_line_and_exit_code_2() -> None:
    result = run_serve(MEDMO_MAX_BATCH_SIZE="zero")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "MEDMO_MAX_BATCH_SIZE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_model_that_cannot_load_stops_startup_with_one_sentence(tmp_path: Path) -> None:
    result = run_serve("--model", str(tmp_path / "missing"), "--port", "0")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"MEDMO_MODEL='{tmp_path / 'missing'}' is not an existing folder" in result.stderr


def test_a_model_that_is_neither_a_folder_nor_a_hub_id_is_one_sentence(tmp_path: Path) -> None:
    # A relative path that does not exist here reads as a hub id to huggingface_hub, which refuses it.
    result = run_serve("--model", "models/medmo/8b", "--port", "0", HF_HOME=str(tmp_path / "hf"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "MEDMO_MODEL='models/medmo/8b' is neither an existing folder nor a hub id" in result.stderr


def test_damaged_weights_stop_startup_with_one_sentence(random_checkpoint: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(random_checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut short
    result = run_serve("--model", str(damaged), "--port", "0")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"could not load model '{damaged}'" in result.stderr


def test_download_only_leaves_a_local_model_folder_alone(random_checkpoint: Path, tmp_path: Path) -> None:
    result = run_serve("--download-only", MEDMO_MODEL=str(random_checkpoint), HF_HOME=str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"medmo-serve: {random_checkpoint} is a local folder; nothing to download: "
    )
    assert not (tmp_path / "hf").exists()


def test_download_only_offline_fails_when_the_cache_lacks_the_model(tmp_path: Path) -> None:
    # What a cluster without internet relies on: an empty cache is an error, named, not a hang.
    result = run_serve("--download-only", HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "'MBZUAI/MedMO-8B-Next' is not in the Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in result.stderr


def test_serves_a_tiny_checkpoint_over_real_http(random_checkpoint: Path, tmp_path: Path) -> None:
    with serve(random_checkpoint, tmp_path / "server.log") as server:
        response = httpx.post(
            f"{server.url}/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": "Is this normal?"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        assert response.json()["model"] == str(random_checkpoint)
        assert server.terminate() == 0


def test_tiny_checkpoint_script_writes_a_reply_checkpoint(
    tmp_path: Path, reply_checkpoint: Callable[[str], Path]
) -> None:
    reply = "Findings: no acute abnormality.\n\nImpression: normal."
    subprocess.run(
        [console_script("medmo-tiny-checkpoint"), str(tmp_path), "--reply", reply], check=True, timeout=120
    )
    runtime = ModelRuntime.load(Settings(model=str(tmp_path)))
    options = GenerationOptions(max_new_tokens=16)
    prepared = [
        runtime.prepare(Conversation.about(rgb_image(w, h), q), options)
        for w, h, q in ((64, 64, "a"), (200, 96, "something longer"))
    ]
    assert [g.text for g in runtime.generate(prepared)] == [reply, reply]  # batched
    assert runtime.generate(prepared[1:])[0].text == reply  # alone


# Each engine's sign that a request is running.
RUNNING = {"continuous": "medmo_running_requests 1.0", "generate": "medmo_batch_size_count 1.0"}


@pytest.mark.parametrize("engine", sorted(RUNNING))
def test_sigterm_drains_accepted_work_refuses_new_work_then_exits(
    engine: str, random_checkpoint: Path, tmp_path: Path
) -> None:
    env = {
        "MEDMO_ENGINE": engine,
        "MEDMO_REPORT_MAX_NEW_TOKENS": "4000",
        "MEDMO_MAX_CONTEXT": "8192",
        "MEDMO_SHUTDOWN_GRACE_S": "60",
    }
    with serve(random_checkpoint, tmp_path / "server.log", env=env) as server, ThreadPoolExecutor(1) as pool:
        long_report = pool.submit(
            httpx.post,
            f"{server.url}/report",
            files={"image": ("a.png", png_bytes(96, 64), "image/png")},
            timeout=120,
        )
        deadline = time.monotonic() + 30
        while RUNNING[engine] not in httpx.get(f"{server.url}/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        refused = httpx.post(
            f"{server.url}/vqa", files={"image": ("a.png", png_bytes(), "image/png")}, data={"question": "q"}
        )
        assert refused.status_code == 503
        assert not long_report.done()
        finished = long_report.result()
        assert finished.status_code == 200
        assert finished.json()["usage"]["completion_tokens"] == 4000  # it really was in flight throughout
        assert server.process.wait(30) == 0
