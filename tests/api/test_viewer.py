"""The viewer page in a real browser (Debian's Chromium, driven by Playwright), against a real server.

The server's tiny checkpoint answers MedMO's README grounding example to anything, so the page's boxes can
be checked against the JSON it received: read back from the canvas it drew them on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from bench.servers import RunningServer, serve
from tests.conftest import README_GROUNDING_REPLY, png_bytes, pydicom_file

KEY = "viewer-key-of-enough-length-0001"
CHROMIUM = "/usr/bin/chromium"
# A headless browser on a machine with no network: nothing in the background may reach out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
STROKES = ["#e69f00", "#56b4e9"]  # the page's palette, first two


@pytest.fixture(scope="module")
def viewer_server(
    reply_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("viewer") / "server.log"
    with serve(reply_checkpoint(README_GROUNDING_REPLY), log, env={"MEDMO_API_KEYS": KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, viewer_server: RunningServer) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    outside: list[str] = []
    page.on(
        "request",
        lambda request: (
            outside.append(request.url) if not request.url.startswith(viewer_server.url) else None
        ),
    )
    page.goto(f"{viewer_server.url}/")
    page.fill("#key", KEY)
    yield page
    assert outside == [], f"the page reached outside the service: {outside}"
    page.close()


def pixel(page: Page, x: int, y: int) -> str:
    rgba = page.evaluate(
        "([x, y]) => Array.from(document.getElementById('picture').getContext('2d').getImageData(x, y, 1, 1).data)",
        [x, y],
    )
    return "#" + "".join(f"{value:02x}" for value in rgba[:3])


def run(page: Page, task: str, file: Path, wait_for: str) -> dict:  # type: ignore[type-arg]
    page.set_input_files("#image", str(file))
    page.wait_for_function("document.getElementById('picture').width > 0")
    page.check(f"input[name=task][value={task}]")
    page.click("#run")
    page.wait_for_selector(wait_for, state="attached")
    page.wait_for_function("document.getElementById('raw').textContent.length > 0")
    return json.loads(page.text_content("#raw") or "")  # type: ignore[no-any-return]


def test_boxes_are_drawn_where_the_json_says(page: Page, tmp_path: Path) -> None:
    image = tmp_path / "xray.png"
    image.write_bytes(png_bytes(1000, 800))
    result = run(page, "ground", image, "#findings li")
    assert page.evaluate(
        "[document.getElementById('picture').width, document.getElementById('picture').height]"
    ) == [1000, 800]
    boxes = [item.get_attribute("data-box") for item in page.query_selector_all("#findings li")]
    expected = [finding["box_px"] for finding in result["findings"]]
    assert len(boxes) == len(expected) == 2
    for drawn, box, stroke in zip(boxes, expected, STROKES, strict=True):
        x_min, y_min, x_max, y_max = (int(value) for value in (drawn or "").split(","))
        assert (x_min, y_min, x_max, y_max) == tuple(
            round(box[key]) for key in ("x_min", "y_min", "x_max", "y_max")
        )
        # The canvas itself: the stroke on the box's lower and right edges, the picture in its middle.
        middle_x, middle_y = (x_min + x_max) // 2, (y_min + y_max) // 2
        assert pixel(page, middle_x, y_max) == stroke
        assert pixel(page, x_max, middle_y) == stroke
        assert pixel(page, middle_x, middle_y) != stroke
    page.screenshot(path=str(tmp_path / "viewer-ground.png"), full_page=True)


def test_a_dicom_report_is_shown_as_it_is_written(page: Page, tmp_path: Path) -> None:
    dicom = tmp_path / "ct.dcm"
    dicom.write_bytes(pydicom_file("CT_small.dcm"))
    result = run(page, "report", dicom, "#raw:not(:empty)")
    assert result["dicom"]["modality"] == "CT"
    assert page.evaluate("document.getElementById('picture').width") == 128  # the preview of the DICOM
    assert page.inner_text("#answer").strip() == result["report"]["findings"]
    page.screenshot(path=str(tmp_path / "viewer-report.png"), full_page=True)


def test_a_wrong_key_is_said_on_the_page(page: Page, tmp_path: Path) -> None:
    page.fill("#key", "not-the-key-of-this-server")
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    page.set_input_files("#image", str(image))
    page.wait_for_selector("#status.error")
    assert "API key" in page.inner_text("#status")


def test_the_page_and_its_assets_come_from_the_service(viewer_server: RunningServer) -> None:
    html = httpx.get(f"{viewer_server.url}/", timeout=10).text
    assert "/viewer-assets/viewer.js" in html
    assert "http" not in html.replace("http-equiv", "")  # no absolute address: nothing from elsewhere
    for asset in ("viewer.js", "viewer.css"):
        response = httpx.get(f"{viewer_server.url}/viewer-assets/{asset}", timeout=10)
        assert response.status_code == 200
        assert "http://" not in response.text
        assert "https://" not in response.text
