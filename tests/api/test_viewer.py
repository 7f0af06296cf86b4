"""The viewer page in a real browser (Debian's Chromium, driven by Playwright), against a real server.

The server's tiny checkpoint answers MedMO's README grounding example to anything, so the page's boxes can
be checked against the JSON it received: read back from the canvas it drew them on. With several images it
answers the same boxes for each, in that image's own model-input pixels, so every image has boxes of its own.
"""

from __future__ import annotations

import base64
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
PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7"]  # the page's
STROKES = PALETTE[:2]
# Three images of different sizes and shapes, each large enough in the model's input for both boxes.
SIZES = [(1000, 800), (640, 960), (1280, 720)]
CAPTIONS = ["frontal", "", "prior, a year earlier"]
READY = "() => document.getElementById('status').textContent.includes('choose a task')"


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
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
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
    assert errors == [], f"the page's script failed: {errors}"
    page.close()


def pixel(page: Page, x: int, y: int) -> str:
    rgba = page.evaluate(
        "([x, y]) => Array.from(document.getElementById('picture').getContext('2d').getImageData(x, y, 1, 1).data)",
        [x, y],
    )
    return "#" + "".join(f"{value:02x}" for value in rgba[:3])


def canvas_size(page: Page) -> list[int]:
    return page.evaluate(  # type: ignore[no-any-return]
        "[document.getElementById('picture').width, document.getElementById('picture').height]"
    )


def assert_drawn(page: Page, box_px: dict[str, float], stroke: str) -> None:
    """The stroke on the box's lower and right edges, the picture in its middle: the canvas itself."""
    x_min, y_min, x_max, y_max = (round(box_px[key]) for key in ("x_min", "y_min", "x_max", "y_max"))
    middle_x, middle_y = (x_min + x_max) // 2, (y_min + y_max) // 2
    assert pixel(page, middle_x, y_max) == stroke
    assert pixel(page, x_max, middle_y) == stroke
    assert pixel(page, middle_x, middle_y) != stroke


def run(page: Page, task: str, file: Path, wait_for: str) -> dict:  # type: ignore[type-arg]
    page.set_input_files("#image", str(file))
    page.wait_for_function("() => document.getElementById('picture').width > 0")
    page.check(f"input[name=task][value={task}]")
    page.click("#run")
    page.wait_for_selector(wait_for, state="attached")
    page.wait_for_function("() => document.getElementById('raw').textContent.length > 0")
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
        assert_drawn(page, box, stroke)
    page.screenshot(path=str(tmp_path / "viewer-ground.png"), full_page=True)


def test_several_images_each_show_their_own_boxes(
    page: Page, viewer_server: RunningServer, tmp_path: Path
) -> None:
    files = []
    for index, (width, height) in enumerate(SIZES):
        files.append(tmp_path / f"view-{index + 1}.png")
        files[-1].write_bytes(png_bytes(width, height, seed=index))
    page.set_input_files("#image", [str(file) for file in files])
    page.wait_for_function(READY)
    assert len(page.query_selector_all("#thumbs li")) == 3
    for index, caption in enumerate(CAPTIONS):
        page.fill(f"#caption-{index}", caption)
    page.check("input[name=task][value=ground]")
    page.click("#run")
    page.wait_for_selector("#findings li", state="attached")
    page.wait_for_function("() => document.getElementById('raw').textContent.length > 0")
    shown = json.loads(page.text_content("#raw") or "")

    # The same request from a client: the page sent the three images, in order, with their captions.
    sent = httpx.post(
        f"{viewer_server.url}/ground",
        files=[("image", (file.name, file.read_bytes(), "image/png")) for file in files],
        data={"caption": CAPTIONS},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    )
    assert sent.status_code == 200, sent.text
    expected = sent.json()
    assert [image["caption"] for image in shown["images"]] == ["frontal", None, "prior, a year earlier"]
    assert [(image["width"], image["height"]) for image in expected["images"]] == SIZES
    assert shown["findings"] == expected["findings"]
    assert sorted({finding["image_index"] for finding in expected["findings"]}) == [0, 1, 2]
    assert len(expected["findings"]) == 6  # both boxes on each image

    # The list says which image each finding is on.
    items = page.query_selector_all("#findings li")
    assert len(items) == len(expected["findings"])
    for item, finding in zip(items, expected["findings"], strict=True):
        index = finding["image_index"]
        assert item.get_attribute("data-image") == str(index)
        assert item.inner_text().startswith(f"Image {index + 1} (view-{index + 1}.png): ")

    # Each image, chosen by its thumbnail (the second by keyboard), shown at its own size with its own boxes.
    for index, size in enumerate(SIZES):
        thumbnail = page.locator("#thumbs button.pick").nth(index)
        if index == 1:
            thumbnail.focus()
            page.keyboard.press("Enter")
        else:
            thumbnail.click()
        assert thumbnail.get_attribute("aria-pressed") == "true"
        assert canvas_size(page) == list(size)
        assert page.inner_text("#shown").startswith(f"Image {index + 1} of 3: view-{index + 1}.png")
        on_it = [
            (order, finding)
            for order, finding in enumerate(expected["findings"])
            if finding["image_index"] == index
        ]
        assert len(on_it) == 2
        for order, finding in on_it:
            assert_drawn(page, finding["box_px"], PALETTE[order % len(PALETTE)])
        page.screenshot(path=str(tmp_path / f"viewer-ground-{index + 1}.png"), full_page=True)

    # A finding in the list shows its own image.
    items[0].query_selector("button").click()  # type: ignore[union-attr]
    assert canvas_size(page) == list(SIZES[0])


def test_more_images_than_the_server_takes_are_said(page: Page, tmp_path: Path) -> None:
    files = []
    for index in range(9):  # the server's default MEDMO_MAX_IMAGES is 8
        files.append(tmp_path / f"slice-{index + 1}.png")
        files[-1].write_bytes(png_bytes(seed=index))
    page.set_input_files("#image", [str(file) for file in files])
    page.wait_for_function(READY)
    assert "9 files chosen, but this server takes at most 8 images" in page.inner_text("#status")
    assert len(page.query_selector_all("#thumbs li")) == 8
    assert "slice-9.png" not in page.inner_text("#thumbs")
    assert "Up to 8 images per request" in page.inner_text("#limit")


def thumbnail_names(page: Page) -> list[str]:
    return [name.inner_text() for name in page.query_selector_all("#thumbs .thumb-name")]


def test_a_folder_of_one_series_is_read_in_path_order(page: Page, tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for number in (10, 2, 1):
        (series / f"slice-{number}.png").write_bytes(png_bytes(seed=number))
    (series / ".DS_Store").write_bytes(b"\0")  # not an image of the series
    page.set_input_files("#folder", str(series))
    page.wait_for_function(READY)
    assert thumbnail_names(page) == ["1. slice-1.png", "2. slice-2.png", "3. slice-10.png"]


def test_files_dropped_together_are_taken_together(page: Page) -> None:
    dropped = [
        [f"drop-{index + 1}.png", base64.b64encode(png_bytes(64 + 32 * index, 64, seed=index)).decode()]
        for index in range(2)
    ]
    page.evaluate(
        """(dropped) => {
            const transfer = new DataTransfer();
            for (const [name, encoded] of dropped) {
                const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name, { type: "image/png" }));
            }
            const drop = new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true });
            document.getElementById("drop").dispatchEvent(drop);
        }""",
        dropped,
    )
    page.wait_for_function(READY)
    assert thumbnail_names(page) == ["1. drop-1.png", "2. drop-2.png"]
    page.locator("#thumbs button.pick").nth(1).click()
    assert canvas_size(page) == [96, 64]


def test_an_image_removed_takes_nothing_else_with_it(page: Page, tmp_path: Path) -> None:
    files = []
    for index in range(3):
        files.append(tmp_path / f"part-{index + 1}.png")
        files[-1].write_bytes(png_bytes(64 + 16 * index, 64, seed=index))
    page.set_input_files("#image", [str(file) for file in files])
    page.wait_for_function(READY)
    page.fill("#caption-2", "lateral")
    page.locator("#thumbs button.pick").nth(2).click()
    page.click("#thumbs li:nth-child(2) button.remove")
    assert thumbnail_names(page) == ["1. part-1.png", "2. part-3.png"]
    assert page.input_value("#caption-1") == "lateral"  # the caption stays with its image
    assert canvas_size(page) == [96, 64]  # the image shown is still the one chosen
    assert "Removed part-2.png; 2 left." in page.inner_text("#status")
    assert page.evaluate("document.activeElement.classList.contains('pick')")  # focus stays in the list


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
    # The right key reads the image again, without choosing it again.
    page.fill("#key", KEY)
    page.press("#key", "Tab")
    page.wait_for_function(READY)
    assert canvas_size(page) == [96, 64]


def test_the_page_and_its_assets_come_from_the_service(viewer_server: RunningServer) -> None:
    html = httpx.get(f"{viewer_server.url}/", timeout=10).text
    assert "/viewer-assets/viewer.js" in html
    assert "http" not in html.replace("http-equiv", "")  # no absolute address: nothing from elsewhere
    for asset in ("viewer.js", "viewer.css"):
        response = httpx.get(f"{viewer_server.url}/viewer-assets/{asset}", timeout=10)
        assert response.status_code == 200
        assert "http://" not in response.text
        assert "https://" not in response.text
