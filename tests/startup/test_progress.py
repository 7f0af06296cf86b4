"""Startup phases: what /readyz says while they run, and how their progress is shown."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.api.deps import Service
from app.engine.runtime import ModelRuntime
from app.main import create_app, create_probe_app
from app.startup.progress import Phase, StartupProgress
from tests.conftest import settings_for


def test_readyz_names_the_phase_and_its_progress_on_both_ports(random_checkpoint: Path) -> None:
    app = create_app(settings_for(random_checkpoint))
    service = app.state.service
    assert isinstance(service, Service)
    # Without entering the clients, the lifespan has not run: the phases are driven by hand.
    main, probes = TestClient(app), TestClient(create_probe_app(app))

    def readyz() -> list[tuple[int, object]]:
        return [(r.status_code, r.json()) for r in (main.get("/readyz"), probes.get("/readyz"))]

    assert readyz() == [(503, {"status": "starting"})] * 2
    with service.startup.phase(Phase.DOWNLOADING, began="downloading", ended="downloaded"):
        assert readyz() == [(503, {"status": "downloading"})] * 2  # no percentage known yet
        service.startup.report(42.46)
        assert readyz() == [(503, {"status": "downloading", "progress": 42.5})] * 2
    with service.startup.phase(Phase.LOADING, began="loading", ended="loaded"):
        assert readyz() == [(503, {"status": "loading"})] * 2
    with service.startup.phase(Phase.WARMING_UP, began="warming up", ended="warmed up"):
        assert readyz() == [(503, {"status": "warming_up"})] * 2
    assert readyz() == [(503, {"status": "starting"})] * 2
    assert main.get("/healthz").json() == {"status": "ok"}  # alive throughout


def test_without_a_terminal_progress_is_a_json_line_at_most_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="medmo.startup")
    progress = StartupProgress(interval_s=0.1, interactive=False)
    began = time.monotonic()
    with progress.phase(
        Phase.DOWNLOADING, began="downloading the model", ended="downloaded the model", files=3
    ):
        bar = progress.bar(
            total=4_000_000, desc="downloading", unit="B", unit_scale=True, details=lambda: {"x": 1}
        )
        for _ in range(40):
            bar.update(100_000)
            time.sleep(0.01)
        assert progress.state is not None
        assert progress.state.phase is Phase.DOWNLOADING
        assert 50 < (progress.state.percent or 0) <= 100  # refreshed without waiting for a log line
    elapsed = time.monotonic() - began
    fields = [getattr(record, "fields", {}) for record in caplog.records]
    lines = [line for line in fields if "done" in line]
    assert 2 <= len(lines) <= elapsed / 0.1 + 1
    assert all(line["total"] == 4_000_000 and line["unit"] == "B" and line["x"] == 1 for line in lines)
    assert [line["percent"] for line in lines] == sorted(line["percent"] for line in lines)
    assert all(line["rate_per_s"] > 0 and line["eta_s"] >= 0 for line in lines)
    assert caplog.records[0].getMessage() == "downloading the model"
    assert fields[0] == {"phase": "downloading", "files": 3}
    assert caplog.records[-1].getMessage().startswith("downloaded the model in ")
    assert fields[-1]["duration_s"] >= 0.4
    assert progress.state is None


def test_on_a_terminal_progress_is_a_bar_and_not_a_log_line(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="medmo.startup")
    progress = StartupProgress(interval_s=0.01, interactive=True)
    with progress.phase(Phase.LOADING, began="loading", ended="loaded"):
        bar = progress.bar(total=10, desc="loading", unit="weights")
        for _ in range(10):
            bar.update(1)
            time.sleep(0.01)
    drawn = capsys.readouterr().err
    assert "loading: 100%|" in drawn
    assert "10/10" in drawn
    assert caplog.records[0].getMessage() == "loading"
    assert not [record for record in caplog.records if "done" in getattr(record, "fields", {})]


def test_a_failed_phase_logs_no_end_and_leaves_no_phase_behind(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="medmo.startup")
    progress = StartupProgress(interactive=False)
    with pytest.raises(RuntimeError), progress.phase(Phase.LOADING, began="loading", ended="loaded"):
        raise RuntimeError("no memory")
    assert [record.getMessage() for record in caplog.records] == ["loading"]
    assert progress.state is None


def test_a_phase_whose_total_is_known_is_at_zero_from_its_first_moment() -> None:
    # A download knows its bytes before the first one arrives: /readyz says 0 % rather than nothing.
    progress = StartupProgress(interactive=False)
    with progress.phase(Phase.DOWNLOADING, began="downloading", ended="downloaded", measured=True):
        assert progress.state is not None
        assert progress.state.percent == 0.0
    with progress.phase(Phase.LOADING, began="loading", ended="loaded"):
        assert progress.state is not None
        assert progress.state.percent is None


def test_loading_reports_the_tensors_transformers_puts_on_the_device(
    random_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="medmo.startup")
    progress = StartupProgress(interval_s=0.001, interactive=False)
    ModelRuntime.load(settings_for(random_checkpoint), progress)
    fields = [getattr(record, "fields", {}) for record in caplog.records]
    loading = [line for line in fields if line.get("phase") == "loading" and "done" in line]
    assert loading, fields
    assert {line["unit"] for line in loading} == {"tensors"}
    # A line may come before the first tensor lands (0 of N, on a busy machine); counts only grow.
    done = [line["done"] for line in loading]
    assert all(0 <= line["done"] <= line["total"] for line in loading)
    assert done == sorted(done)
    assert done[-1] > 0
    assert [line.get("duration_s") is not None for line in fields if line.get("phase") == "loading"][-1]


def test_work_that_counts_itself_is_a_bar_of_the_phase(caplog: pytest.LogCaptureFixture) -> None:
    # How the engine's warm-up reports decode graphs captured on a GPU (SlotRunner.on_graph_captured).
    caplog.set_level(logging.INFO, logger="medmo.startup")
    progress = StartupProgress(interval_s=0.001, interactive=False)
    percents = []
    with progress.phase(Phase.WARMING_UP, began="warming up", ended="warmed up"):
        captured = progress.counter("capturing decode graphs", "graphs")
        for done in range(1, 5):
            time.sleep(0.002)
            captured(done, 4)
            assert progress.state is not None
            percents.append(progress.state.percent)
    assert percents[-1] == 100.0
    assert percents == sorted(percents)
    lines = [getattr(record, "fields", {}) for record in caplog.records]
    counted = [line for line in lines if line.get("unit") == "graphs"]
    assert counted
    assert counted[-1]["total"] == 4
    assert caplog.records[-1].getMessage().startswith("warmed up in ")
