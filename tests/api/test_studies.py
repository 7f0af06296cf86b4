"""Several images in one request over HTTP: captions, order, each finding on its own image, and DICOM
answers that reference every image."""

from __future__ import annotations

import base64
import copy
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from qwen_vl_utils import smart_resize

from app.main import create_app
from app.settings import Settings
from tests.conftest import README_GROUNDING_REPLY, png_bytes, settings_for
from tests.dicom_validator import dciodvfy_errors
from tests.pacs.studies import Examination, _file, cr_study, ct_series

GSPS = "application/dicom; object=gsps"
# MedMO's README grounding reply, in the pixels of whatever image the model was shown.
README_BOXES = [(156, 516, 231, 607), (240, 529, 296, 581)]
SIZES = [(1000, 800), (640, 960), (1200, 600)]

pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)


# For the small DICOM images of these tests, which the model sees at 256 x 256: boxes well inside them.
DICOM_REPLY = "Nodule <box>[[40, 60, 120, 140]]</box>\nEffusion <box>[[150, 30, 200, 90]]</box>"


@pytest.fixture(scope="module")
def readme_client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(reply_checkpoint(README_GROUNDING_REPLY)))) as client:
        yield client


@pytest.fixture(scope="module")
def dicom_client(reply_checkpoint: Callable[[str], Path]) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(reply_checkpoint(DICOM_REPLY)))) as client:
        yield client


def model_input_size(width: int, height: int, settings: Settings) -> tuple[int, int]:
    """The size the processor feeds an image of this size at: what MedMO's pixel boxes are relative to."""
    fed_height, fed_width = smart_resize(height, width, 32, settings.min_pixels, settings.max_pixels)
    return fed_width, fed_height


def post(
    client: TestClient, path: str, images: list[bytes], accept: str = "application/json", **data: Any
) -> Any:
    return client.post(
        path,
        files=[
            ("image", (f"image-{n}", image, "application/octet-stream")) for n, image in enumerate(images)
        ],
        data=data,
        headers={"Accept": accept},
    )


def test_ground_on_three_images_puts_each_finding_on_its_image_in_its_pixels(
    readme_client: TestClient,
) -> None:
    settings = readme_client.app.state.service.settings  # type: ignore[attr-defined]
    images = [png_bytes(width, height, seed=n) for n, (width, height) in enumerate(SIZES)]
    response = post(readme_client, "/ground", images, caption=["frontal", "lateral", "prior, 2025-03-02"])
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [(i["index"], i["shown_as"], i["caption"], i["width"], i["height"]) for i in answer["images"]] == [
        (0, 1, "frontal", 1000, 800),
        (1, 2, "lateral", 640, 960),
        (2, 3, "prior, 2025-03-02", 1200, 600),
    ]
    assert answer["dropped_boxes"] == 0
    assert answer["raw_text"] == "\n\n".join([README_GROUNDING_REPLY] * 3)  # one query per image
    findings = answer["findings"]
    assert [finding["image_index"] for finding in findings] == [0, 0, 1, 1, 2, 2]
    for finding, (index, box) in zip(findings, [(i, b) for i in range(3) for b in README_BOXES], strict=True):
        width, height = SIZES[index]
        fed_width, fed_height = model_input_size(width, height, settings)
        x_min, y_min, x_max, y_max = box
        expected = [x_min / fed_width * width, y_min / fed_height * height]
        expected += [x_max / fed_width * width, y_max / fed_height * height]
        got = finding["box_px"]
        assert [got["x_min"], got["y_min"], got["x_max"], got["y_max"]] == pytest.approx(expected)
        assert finding["box"]["x_min"] == pytest.approx(x_min / fed_width)
        assert finding["label"] == "Fractures"
        assert finding["sop_instance_uid"] is None
    # The same images as JSON, each with its caption, give the same findings.
    as_json = readme_client.post(
        "/ground",
        json={
            "images": [
                {"image": base64.b64encode(image).decode(), "caption": caption}
                for image, caption in zip(images, ["frontal", "lateral", "prior, 2025-03-02"], strict=True)
            ]
        },
    )
    assert as_json.status_code == 200, as_json.text
    assert as_json.json()["findings"] == findings
    assert answer["usage"]["completion_tokens"] == 3 * 2  # three queries, each the reply and its end


def test_one_image_stays_the_simplest_call(readme_client: TestClient) -> None:
    response = post(readme_client, "/ground", [png_bytes(1000, 800)])
    assert response.status_code == 200
    answer = response.json()
    assert answer["raw_text"] == README_GROUNDING_REPLY
    assert [finding["image_index"] for finding in answer["findings"]] == [0, 0]
    assert answer["images"] == [
        {"index": 0, "shown_as": 1, "caption": None, "width": 1000, "height": 800, "dicom": None}
    ]
    assert answer["image"] == {"width": 1000, "height": 800}
    assert answer["finish_reason"] == "stop"


def test_the_picture_of_a_chosen_image_draws_its_own_findings(readme_client: TestClient) -> None:
    images = [png_bytes(width, height, seed=n) for n, (width, height) in enumerate(SIZES)]
    findings = post(readme_client, "/ground", images).json()["findings"]
    drawn = readme_client.post(
        "/ground",
        params={"image": 1},
        files=[("image", (f"image-{n}", image, "image/png")) for n, image in enumerate(images)],
        headers={"Accept": "image/png"},
    )
    assert drawn.status_code == 200, drawn.text
    picture = np.asarray(Image.open(io.BytesIO(drawn.content)).convert("RGB"))
    assert picture.shape[:2] == (960, 640)  # the second image, at its own size
    changed = np.any(picture != np.asarray(Image.open(io.BytesIO(images[1])).convert("RGB")), axis=2)
    for finding in findings:
        box = finding["box_px"]
        row, column = round((box["y_min"] + box["y_max"]) / 2), round(box["x_min"] + 1)
        on_left_edge = changed[row, column]
        assert on_left_edge == (finding["image_index"] == 1)  # only the second image's boxes are drawn
    out_of_range = readme_client.post(
        "/ground",
        params={"image": 3},
        files=[("image", (f"image-{n}", image, "image/png")) for n, image in enumerate(images)],
        headers={"Accept": "image/png"},
    )
    assert out_of_range.status_code == 422
    assert "the request has 3" in out_of_range.json()["error"]["message"]


def shuffled_ct(slices: int = 5) -> Examination:
    examination = ct_series(slices=slices, size=64)
    order = [3, 0, 4, 1, 2][:slices]
    return Examination([examination.files[i] for i in order], [examination.datasets[i] for i in order])


def test_slices_of_a_series_are_shown_in_anatomical_order_unless_the_client_orders_them(
    readme_client: TestClient,
) -> None:
    ct = shuffled_ct()
    heights = [float(dataset.ImagePositionPatient[2]) for dataset in ct.datasets]
    answer = post(readme_client, "/vqa", ct.files, question="Any nodule?").json()
    shown = [image["shown_as"] for image in answer["images"]]
    by_position = sorted(range(len(heights)), key=lambda i: heights[i])
    assert [by_position.index(i) + 1 for i in range(len(heights))] == shown
    assert shown != [1, 2, 3, 4, 5]  # sent shuffled, so the order was really changed
    assert [image["dicom"]["sop_instance_uid"] for image in answer["images"]] == [
        str(dataset.SOPInstanceUID) for dataset in ct.datasets
    ]
    as_sent = post(readme_client, "/vqa", ct.files, question="Any nodule?", image_order="as_sent").json()
    assert [image["shown_as"] for image in as_sent["images"]] == [1, 2, 3, 4, 5]


def cr_views_of_two_sizes() -> Examination:
    """Three views of one chest radiograph study; the lateral is taller than the others."""
    study = cr_study(views=("PA", "LL", "AP"), size=96)
    lateral = copy.deepcopy(study.datasets[1])
    lateral.Rows, lateral.Columns = 128, 96
    lateral.PixelData = np.linspace(200, 3800, 128 * 96).astype(np.uint16).tobytes()
    files = [study.files[0], _file(lateral, str(lateral.SOPClassUID)), study.files[2]]
    return Examination(files, [study.datasets[0], lateral, study.datasets[2]])


def test_the_report_and_the_presentation_state_reference_each_region_on_its_own_instance(
    dicom_client: TestClient, tmp_path: Path
) -> None:
    readme_client = dicom_client
    study = cr_views_of_two_sizes()
    answer = post(readme_client, "/ground", study.files).json()
    assert [finding["image_index"] for finding in answer["findings"]] == [0, 0, 1, 1, 2, 2]
    assert answer["dropped_boxes"] == 0
    by_image = {image["index"]: image for image in answer["images"]}
    assert [finding["sop_instance_uid"] for finding in answer["findings"]] == [
        by_image[finding["image_index"]]["dicom"]["sop_instance_uid"] for finding in answer["findings"]
    ]
    uids = [str(dataset.SOPInstanceUID) for dataset in study.datasets]

    report = post(readme_client, "/ground", study.files, "application/dicom")
    assert report.status_code == 200, report.text
    sr = hd.sr.srread(io.BytesIO(report.content))
    assert str(sr.StudyInstanceUID) == study.study_uid
    evidence = [
        str(image.ReferencedSOPInstanceUID)
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for image in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted(uids)
    regions = [
        (
            np.asarray(region.value).reshape(-1, 2),
            str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID),
        )
        for region in hd.sr.utils.find_content_items(
            sr, name=pydicom.sr.codedict.codes.DCM.ImageRegion, recursive=True
        )
    ]
    assert [uid for _, uid in regions] == [uids[finding["image_index"]] for finding in answer["findings"]]
    for (polyline, _), finding in zip(regions, answer["findings"], strict=True):
        box = finding["box_px"]
        assert polyline[0].tolist() == pytest.approx([box["x_min"], box["y_min"]], abs=1e-3)
        assert polyline[2].tolist() == pytest.approx([box["x_max"], box["y_max"]], abs=1e-3)
    assert dciodvfy_errors(report.content, tmp_path) == []

    state_response = post(readme_client, "/ground", study.files, GSPS)
    assert state_response.status_code == 200, state_response.text
    state = pydicom.dcmread(io.BytesIO(state_response.content))
    referenced = [
        str(image.ReferencedSOPInstanceUID)
        for series in state.ReferencedSeriesSequence
        for image in series.ReferencedImageSequence
    ]
    assert sorted(referenced) == sorted(uids)
    annotations = {
        str(item.ReferencedImageSequence[0].ReferencedSOPInstanceUID): item
        for item in state.GraphicAnnotationSequence
    }
    assert sorted(annotations) == sorted(uids)
    for finding in answer["findings"]:
        drawn = [
            list(graphic.GraphicData)[:4]
            for graphic in annotations[uids[finding["image_index"]]].GraphicObjectSequence
        ]
        box = finding["box_px"]
        assert any(
            corners == pytest.approx([box["x_min"], box["y_min"], box["x_max"], box["y_min"]], abs=1e-3)
            for corners in drawn
        )
    # Each image shown whole: one displayed area per image size, naming its images.
    areas = {
        tuple(area.DisplayedAreaBottomRightHandCorner): sorted(
            str(image.ReferencedSOPInstanceUID) for image in area.ReferencedImageSequence
        )
        for area in state.DisplayedAreaSelectionSequence
    }
    assert areas == {(96, 96): sorted([uids[0], uids[2]]), (96, 128): [uids[1]]}
    laterality = "</Laterality(0020,0060)> - Missing attribute for Type 2C"  # General Series: issue 22
    assert [
        error for error in dciodvfy_errors(state_response.content, tmp_path) if laterality not in error
    ] == []


def test_a_prior_goes_into_the_report_as_other_evidence_and_a_presentation_state_refuses_it(
    readme_client: TestClient,
) -> None:
    current, prior = (
        cr_study(views=("PA",), study_date="20250312"),
        cr_study(views=("PA",), study_date="20240301"),
    )
    files = [current.files[0], prior.files[0]]
    report = post(
        readme_client, "/report", files, "application/dicom", caption=["current", "prior, 2024-03-01"]
    )
    assert report.status_code == 200, report.text
    sr = hd.sr.srread(io.BytesIO(report.content))
    assert str(sr.StudyInstanceUID) == current.study_uid  # filed with the current study
    other = [
        (str(study.StudyInstanceUID), str(image.ReferencedSOPInstanceUID))
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for image in series.ReferencedSOPSequence
    ]
    assert other == [(prior.study_uid, str(prior.datasets[0].SOPInstanceUID))]
    refused = post(readme_client, "/ground", files, GSPS)
    assert refused.status_code == 422
    assert "one study" in refused.json()["error"]["message"]


def test_images_of_two_patients_get_no_report(readme_client: TestClient) -> None:
    first = cr_study(views=("PA",))
    other = copy.deepcopy(cr_study(views=("PA",)).datasets[0])
    other.PatientID = "ANOTHER-PATIENT"
    files = [first.files[0], _file(other, str(other.SOPClassUID))]
    refused = post(readme_client, "/report", files, "application/dicom")
    assert refused.status_code == 422
    assert "different patients" in refused.json()["error"]["message"]
    mixed = post(readme_client, "/report", [first.files[0], png_bytes()], "application/dicom")
    assert mixed.status_code == 406
    assert "every one of them" in mixed.json()["error"]["message"]


def test_a_streamed_grounding_of_several_images_names_the_image_of_each_delta(
    readme_client: TestClient,
) -> None:
    images = [png_bytes(width, height, seed=n) for n, (width, height) in enumerate(SIZES)]
    whole = post(readme_client, "/ground", images).json()
    streamed = post(readme_client, "/ground", images, "text/event-stream")
    assert streamed.status_code == 200
    events = [block for block in streamed.text.split("\n\n") if block.strip()]
    deltas = [json.loads(block.split("data: ", 1)[1]) for block in events if block.startswith("event: delta")]
    (result,) = [
        json.loads(block.split("data: ", 1)[1]) for block in events if block.startswith("event: result")
    ]
    assert sorted({delta["image_index"] for delta in deltas}) == [0, 1, 2]
    for index in range(3):
        assert "".join(d["text"] for d in deltas if d["image_index"] == index) == README_GROUNDING_REPLY
    assert result["findings"] == whole["findings"]


def test_limits_count_all_images_together(reply_checkpoint: Callable[[str], Path]) -> None:
    settings = settings_for(
        reply_checkpoint(README_GROUNDING_REPLY), max_images=3, max_total_pixels=1000 * 800 + 640 * 960 - 1
    )
    with TestClient(create_app(settings)) as client:
        four = post(client, "/vqa", [b"never decoded"] * 4, question="q")
        assert four.status_code == 413
        assert four.json()["error"]["code"] == "too_many_images"
        assert "MEDMO_MAX_IMAGES" in four.json()["error"]["message"]
        over_budget = post(client, "/vqa", [png_bytes(1000, 800), png_bytes(640, 960)], question="q")
        assert over_budget.status_code == 413
        assert "MEDMO_MAX_TOTAL_PIXELS" in over_budget.json()["error"]["message"]
        assert "image 2 of 2" in over_budget.json()["error"]["message"]
        within = post(client, "/vqa", [png_bytes(1000, 800), png_bytes(640, 959)], question="q")
        assert within.status_code == 200
        info = client.get("/info").json()["limits"]
        assert (info["max_images"], info["max_total_pixels"]) == (3, 1000 * 800 + 640 * 960 - 1)
