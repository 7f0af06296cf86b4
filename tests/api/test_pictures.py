"""/ground answered as a picture with the findings drawn, or as a DICOM Presentation State, over HTTP."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging import ImageLimits, decode_image
from app.main import create_app
from tests.conftest import README_GROUNDING_REPLY, png_bytes, pydicom_file, settings_for

# For a 128 x 128 CT, which the model sees at 256 x 256: one box, well inside the picture.
CT_REPLY = "Nodule <box>[[40, 60, 120, 140]]</box>"
GSPS = "application/dicom; object=gsps"

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)


@pytest.fixture(scope="module")
def readme_client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(reply_checkpoint(README_GROUNDING_REPLY)))) as client:
        yield client


@pytest.fixture(scope="module")
def ct_client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(reply_checkpoint(CT_REPLY)))) as client:
        yield client


def ground(client: TestClient, data: bytes, accept: str, **fields: str) -> object:
    return client.post(
        "/ground",
        files={"image": ("scan", data, "application/octet-stream")},
        data=fields,
        headers={"Accept": accept},
    )


def test_the_findings_drawn_on_the_upload_at_its_size(readme_client: TestClient) -> None:
    upload = png_bytes(1000, 800)
    answer = ground(readme_client, upload, "application/json").json()  # type: ignore[attr-defined]
    drawn = ground(readme_client, upload, "image/png")
    assert drawn.status_code == 200  # type: ignore[attr-defined]
    assert drawn.headers["content-type"] == "image/png"  # type: ignore[attr-defined]
    picture = Image.open(io.BytesIO(drawn.content))  # type: ignore[attr-defined]
    assert picture.size == (1000, 800)
    changed = np.any(
        np.asarray(picture.convert("RGB")) != np.asarray(Image.open(io.BytesIO(upload)).convert("RGB")),
        axis=2,
    )
    assert len(answer["findings"]) == 2
    for finding in answer["findings"]:
        box = finding["box_px"]
        x_min, y_max = round(box["x_min"]), round(box["y_max"])
        middle_x, middle_y = (
            round((box["x_min"] + box["x_max"]) / 2),
            round((box["y_min"] + box["y_max"]) / 2),
        )
        assert changed[y_max, middle_x]
        assert changed[middle_y, x_min]
        assert not changed[middle_y, middle_x]
    assert not changed[:100, :].any()  # far from both boxes: the upload as it was
    jpeg = ground(readme_client, upload, "image/jpeg")
    assert jpeg.headers["content-type"] == "image/jpeg"  # type: ignore[attr-defined]
    assert Image.open(io.BytesIO(jpeg.content)).size == (1000, 800)  # type: ignore[attr-defined]


@pytest.mark.parametrize("path", ["/vqa", "/report"])
@pytest.mark.parametrize("accept", ["image/png", "image/jpeg", GSPS])
def test_tasks_that_draw_nothing_refuse_pictures(readme_client: TestClient, path: str, accept: str) -> None:
    response = readme_client.post(
        path,
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"question": "q"} if path == "/vqa" else {},
        headers={"Accept": accept},
    )
    assert response.status_code == 406
    assert "draws no findings" in response.json()["error"]["message"]


@pytest.mark.parametrize("window", ["lung", "bone", "40,400"])
def test_a_dicom_is_drawn_as_displayed_with_the_window_given(ct_client: TestClient, window: str) -> None:
    ct = pydicom_file("CT_small.dcm")
    drawn = np.asarray(
        Image.open(io.BytesIO(ground(ct_client, ct, "image/png", window=window).content)).convert("RGB")
    )  # type: ignore[attr-defined]
    displayed = np.asarray(
        decode_image(ct, ImageLimits(max_bytes=1 << 26, max_pixels=1 << 26), window=window).picture
    )
    # Away from the box (source pixels 20-60 x 30-70) and its label: exactly the windowed image.
    assert np.array_equal(drawn[:, 80:], displayed[:, 80:])
    assert not np.array_equal(drawn[:, :80], displayed[:, :80])


def test_a_presentation_state_for_a_dicom_holds_the_boxes_of_the_json(ct_client: TestClient) -> None:
    ct = pydicom_file("CT_small.dcm")
    source = pydicom.dcmread(io.BytesIO(ct))
    answer = ground(ct_client, ct, "application/json").json()  # type: ignore[attr-defined]
    response = ground(ct_client, ct, GSPS)
    assert response.status_code == 200  # type: ignore[attr-defined]
    assert response.headers["content-type"] == "application/dicom"  # type: ignore[attr-defined]
    state = pydicom.dcmread(io.BytesIO(response.content))  # type: ignore[attr-defined]
    assert state.Modality == "PR"
    assert state.StudyInstanceUID == source.StudyInstanceUID
    assert state.PatientID == source.PatientID
    assert (
        state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == source.SOPInstanceUID
    )
    (finding,) = answer["findings"]
    box = finding["box_px"]
    (graphic,) = state.GraphicAnnotationSequence[0].GraphicObjectSequence
    corners = list(graphic.GraphicData)
    assert corners[:2] == pytest.approx([box["x_min"], box["y_min"]])
    assert corners[4:6] == pytest.approx([box["x_max"], box["y_max"]])
    assert state.GraphicAnnotationSequence[0].TextObjectSequence[0].UnformattedTextValue == "Nodule"


def test_a_presentation_state_needs_a_grayscale_dicom(ct_client: TestClient) -> None:
    assert ground(ct_client, png_bytes(), GSPS).status_code == 406  # type: ignore[attr-defined]
    colour = ground(ct_client, pydicom_file("examples_ybr_color.dcm"), GSPS)
    assert colour.status_code == 422  # type: ignore[attr-defined]
    assert "grayscale" in colour.json()["error"]["message"]  # type: ignore[attr-defined]
