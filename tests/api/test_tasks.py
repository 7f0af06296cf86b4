"""The three task routes over HTTP, driving the real runtime on tiny checkpoints."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.engine.runtime import ModelRuntime
from app.main import create_app
from tests.conftest import README_GROUNDING_REPLY, encode, png_bytes, rgb_image, settings_for

TASKS: list[tuple[str, dict[str, str]]] = [
    ("/vqa", {"question": "Is there a pneumothorax?"}),
    ("/report", {"modality": "chest X-ray", "indication": "cough"}),
    ("/report", {}),
    ("/ground", {"target": "nodule"}),
    ("/ground", {}),
]


def check_envelope(body: dict[str, Any], task: str, width: int, height: int) -> None:
    assert body["task"] == task
    assert body["request_id"]
    assert body["image"] == {"width": width, "height": height}
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["completion_tokens"] > 0
    timing = body["timing"]
    assert 0 <= timing["queue_ms"] <= timing["total_ms"]
    assert 0 < timing["inference_ms"] <= timing["total_ms"]


@pytest.mark.parametrize(("path", "fields"), TASKS)
def test_multipart_upload(random_client: TestClient, path: str, fields: dict[str, str]) -> None:
    response = random_client.post(
        path, files={"image": ("scan.png", png_bytes(120, 90), "image/png")}, data=fields
    )
    assert response.status_code == 200, response.text
    check_envelope(response.json(), path.strip("/"), 120, 90)


@pytest.mark.parametrize(("path", "fields"), TASKS)
def test_json_with_base64(random_client: TestClient, path: str, fields: dict[str, str]) -> None:
    image = base64.b64encode(encode(rgb_image(80, 100), "JPEG")).decode()
    response = random_client.post(path, json={"image": image, **fields})
    assert response.status_code == 200, response.text
    check_envelope(response.json(), path.strip("/"), 80, 100)


def test_json_with_a_data_uri(random_client: TestClient) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(64, 64)).decode()
    response = random_client.post("/vqa", json={"image": uri, "question": "Normal?"})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["answer"], str)


def test_request_id_is_taken_from_the_client_and_echoed(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"question": "q"},
        headers={"X-Request-ID": "ris-4711.2"},
    )
    assert response.json()["request_id"] == "ris-4711.2" == response.headers["x-request-id"]


def test_the_model_is_loaded_once_for_all_requests(
    random_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []
    real_load = ModelRuntime.load.__func__  # type: ignore[attr-defined]

    def counting_load(cls: type[ModelRuntime], settings: Any, *args: Any) -> ModelRuntime:
        loads.append(settings.model)
        return real_load(cls, settings, *args)  # type: ignore[no-any-return]

    monkeypatch.setattr(ModelRuntime, "load", classmethod(counting_load))
    with TestClient(create_app(settings_for(random_checkpoint, vqa_max_new_tokens=4))) as client:
        for path, fields in TASKS:
            assert client.post(
                path, files={"image": ("a.png", png_bytes(), "image/png")}, data=fields
            ).is_success
    assert loads == [str(random_checkpoint)]


@pytest.fixture(scope="module")
def grounding_clients(reply_checkpoint: Callable[[str], Path]) -> Iterator[dict[str, TestClient]]:
    checkpoint = reply_checkpoint(README_GROUNDING_REPLY)
    with (
        TestClient(create_app(settings_for(checkpoint, box_convention="pixel"))) as pixel,
        TestClient(create_app(settings_for(checkpoint, box_convention="rel1000"))) as rel1000,
    ):
        yield {"pixel": pixel, "rel1000": rel1000}


# The upload is 1000x800. The processor feeds the model 992x800 (sides rounded to multiples of 32),
# so MedMO's pixel coordinates are divided by 992 and 800, then scaled to the upload's 1000x800.
EXPECTED = {
    "pixel": [
        (156 / 992, 516 / 800, 231 / 992, 607 / 800),
        (240 / 992, 529 / 800, 296 / 992, 581 / 800),
    ],
    "rel1000": [
        (0.156, 0.516, 0.231, 0.607),
        (0.240, 0.529, 0.296, 0.581),
    ],
}


@pytest.mark.parametrize("convention", ["pixel", "rel1000"])
@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_readme_grounding_example_on_a_non_square_upload(
    grounding_clients: dict[str, TestClient], convention: str, encoding: str
) -> None:
    client = grounding_clients[convention]
    data = png_bytes(1000, 800)
    if encoding == "multipart":
        response = client.post("/ground", files={"image": ("cxr.png", data, "image/png")})
    else:
        response = client.post("/ground", json={"image": base64.b64encode(data).decode()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["raw_text"] == README_GROUNDING_REPLY
    assert body["box_convention"] == convention
    assert body["image"] == {"width": 1000, "height": 800}
    assert [finding["label"] for finding in body["findings"]] == ["Fractures", "Fractures"]
    for finding, (x_min, y_min, x_max, y_max) in zip(body["findings"], EXPECTED[convention], strict=True):
        assert finding["box"] == pytest.approx(
            {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max}
        )
        assert finding["box_px"] == pytest.approx(
            {"x_min": x_min * 1000, "y_min": y_min * 800, "x_max": x_max * 1000, "y_max": y_max * 800}
        )


def test_readme_example_in_pixels_by_hand(grounding_clients: dict[str, TestClient]) -> None:
    response = grounding_clients["pixel"].post(
        "/ground", files={"image": ("a.png", png_bytes(1000, 800), "image/png")}
    )
    first = response.json()["findings"][0]["box_px"]
    # 156 px of a 992-px-wide model input is 157.26 px of the 1000-px upload; heights are unscaled.
    assert first == pytest.approx(
        {"x_min": 157.258, "y_min": 516.0, "x_max": 232.863, "y_max": 607.0}, abs=1e-3
    )
