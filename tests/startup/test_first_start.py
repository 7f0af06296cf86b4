"""A first start, for real and offline: `medmo-serve` given a hub id downloads it from a hub on loopback
(tests/startup/hub.py, the hub's own download API) through huggingface_hub, logs its progress and phases,
names them on /readyz, then serves; `--download-only` fills a cache that an offline start serves from, and
`--check` reads that cache."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.tiny_checkpoint import write_checkpoint
from bench.servers import console_script, free_port, serve
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


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script("medmo-serve"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def downloaded(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache filled by `medmo-serve --download-only`, as the images' and the init container's prefetch do."""
    hf_home = tmp_path_factory.mktemp("prefetched")
    before = len(hub.requests)
    result = run(["--download-only"], hub_env(hub, hf_home, MEDMO_PROGRESS_INTERVAL_S="0.1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"medmo-serve: {REPO} is in the cache: qwen3_vl at ")
    assert any(request.startswith("GET /lfs/") for request in hub.requests[before:])
    ended = [line for line in log_lines(result.stderr) if "duration_s" in line]
    assert [line["phase"] for line in ended] == ["downloading"]  # downloaded, and nothing loaded
    return hf_home


def test_a_download_that_fails_or_is_refused_is_one_sentence(hub: LocalHub, tmp_path: Path) -> None:
    hub.failing.add(WEIGHTS)
    try:
        failed = run(["--download-only"], hub_env(hub, tmp_path / "hf"))
    finally:
        hub.failing.clear()
    assert failed.returncode == 1
    assert failed.stderr.splitlines()[-1].startswith(
        f"medmo-serve: downloading {WEIGHTS} of {REPO!r} failed (HfHubHTTPError: Server error '500"
    )
    unknown = run(["--download-only"], hub_env(hub, tmp_path / "hf", MEDMO_MODEL="medmo-test/nothing"))
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines()[-1].startswith(
        "medmo-serve: the hub has no repository 'medmo-test/nothing'"
    )
    assert "Traceback" not in failed.stderr + unknown.stderr


def test_download_only_leaves_a_cache_an_offline_start_serves_from(
    hub: LocalHub, downloaded: Path, tmp_path: Path
) -> None:
    before = len(hub.requests)
    env = hub_env(hub, downloaded, HF_HUB_OFFLINE="1", MEDMO_VQA_MAX_NEW_TOKENS="4")
    with serve(None, tmp_path / "server.log", env=env) as server:
        answered = httpx.post(
            f"{server.url}/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": "Is this normal?"},
            timeout=60,
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["answer"] == REPLY
        log = server.log()
    assert hub.requests[before:] == []  # not one request to the hub
    phases = [line["phase"] for line in log_lines(log) if "duration_s" in line]
    assert phases == ["loading", "warming_up"]  # nothing to download


def test_check_one_line_each_for_a_good_and_three_broken_configurations(
    hub: LocalHub, downloaded: Path, tmp_path: Path
) -> None:
    offline = {"HF_HUB_OFFLINE": "1"}
    configurations = {
        "good": hub_env(hub, downloaded, **offline),
        "weights missing offline": hub_env(hub, tmp_path / "empty-cache", **offline),
        # A machine without a GPU, whatever this one has.
        "cuda on a cpu machine": hub_env(
            hub, downloaded, MEDMO_DEVICE="cuda", CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="", **offline
        ),
        "unknown attention": hub_env(
            hub, downloaded, MEDMO_ATTN_IMPLEMENTATION="flash_attention_9", **offline
        ),
    }
    with ThreadPoolExecutor(len(configurations)) as pool:
        checked = pool.map(lambda env: run(["--check"], env), configurations.values())
        results = dict(zip(configurations, checked, strict=True))
    lines = {name: result.stdout.splitlines() for name, result in results.items()}

    good = lines["good"]
    assert results["good"].returncode == 0, results["good"]
    assert [line.split(":")[0] for line in good] == ["settings", "device", "dtype", "attention", "weights"]
    assert all(line.split(": ")[1] == "ok" for line in good), good
    assert good[4].startswith(f"weights: ok: qwen3_vl at {hub.repositories[REPO].commit[:12]}, 7 files, ")

    missing = lines["weights missing offline"]
    assert results["weights missing offline"].returncode == 1
    assert [line for line in missing if ": FAILED: " in line] == [
        f"weights: FAILED: {REPO!r} is not in the Hugging Face cache ({tmp_path / 'empty-cache' / 'hub'}): run "
        "`medmo-serve --download-only` where the hub is reachable (with the same HF_HOME), or set MEDMO_MODEL "
        "to a folder holding the weights"
    ]

    no_gpu = lines["cuda on a cpu machine"]
    assert results["cuda on a cpu machine"].returncode == 1
    (failed,) = [line for line in no_gpu if ": FAILED: " in line]
    assert failed.startswith("device: FAILED: MEDMO_DEVICE=cuda but torch sees no GPU (torch ")
    assert [line.split(": ")[1] for line in no_gpu] == ["ok", "FAILED", "not checked", "not checked", "ok"]

    attention = lines["unknown attention"]
    assert results["unknown attention"].returncode == 2
    assert attention == [
        "settings: FAILED: invalid configuration: MEDMO_ATTN_IMPLEMENTATION: Input should be 'auto', "
        "'flash_attention_2', 'sdpa' or 'eager'"
    ]
    assert all(result.stderr.count("Traceback") == 0 for result in results.values())


def test_on_a_terminal_the_download_draws_a_bar_per_file_and_one_for_the_total(
    hub: LocalHub, tmp_path: Path
) -> None:
    hub.slow[WEIGHTS] = 1.0
    primary, secondary = pty.openpty()  # a terminal, as an operator's shell gives one, 120 columns wide
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = hub_env(hub, tmp_path / "hf", TERM="xterm")
    with subprocess.Popen(
        [console_script("medmo-serve"), "--download-only"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
    ) as process:
        os.close(secondary)
        drawn = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closes with the process
                break
            if not chunk:
                break
            drawn += chunk
        assert process.wait(60) == 0, drawn.decode(errors="replace")
    os.close(primary)
    hub.slow.clear()
    screen = drawn.decode(errors="replace")
    # tqdm's bars, redrawn in place: the total (bytes, rate, time left), and the weights file's own.
    total = r"downloading: +\d+%\|.*\| [\d.]+M/\d+\.\dM \[\d\d:\d\d<\d\d:\d\d, +[\d.]+MB/s\]"
    assert re.search(total, screen), screen
    assert re.search(rf"{re.escape(WEIGHTS)}: +\d+%\|.*\| [\d.]+M/\d+\.\dM \[", screen), screen
    assert '"done"' not in screen  # no progress as JSON lines: the phases' start and end only
    assert f"medmo-serve: {REPO} is in the cache" in screen


def test_a_start_stopped_while_downloading_ends_at_once(hub: LocalHub, tmp_path: Path) -> None:
    hub.slow[WEIGHTS] = 60.0  # far longer than the test waits
    probe_port = free_port()
    env = hub_env(hub, tmp_path / "hf", MEDMO_PORT=str(free_port()), MEDMO_PROBE_PORT=str(probe_port))
    log_path = tmp_path / "server.log"
    try:
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [console_script("medmo-serve")], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                status = httpx.get(f"http://127.0.0.1:{probe_port}/readyz", timeout=5).json()["status"]
            except httpx.TransportError:
                status = None
            if status == "downloading":
                break
            time.sleep(0.05)
        stopped_at = time.monotonic()
        process.terminate()
        process.wait(30)
        took = time.monotonic() - stopped_at
    finally:
        hub.slow.clear()
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 128 + 15
    assert took < 5, took
    assert "stopped by SIGTERM while downloading" in log_path.read_text()
