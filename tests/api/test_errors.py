"""Every client mistake is a 4xx with one JSON error shape, never a 500 and never a hang."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.conftest import encode, png_bomb, png_bytes

TEXT_FILE = b"Report for patient Jane Doe.\nThis is plain text, not an image.\n"


def check_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]
    assert error["message"]
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def upload(
    client: TestClient,
    data: bytes,
    filename: str = "scan.png",
    content_type: str = "image/png",
    **fields: str,
) -> Any:
    return client.post(
        "/vqa", files={"image": (filename, data, content_type)}, data={"question": "q", **fields}
    )


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x13\x37" * 200, 400, "unreadable_image"),  # corrupt bytes
        (png_bytes(64, 64)[:300], 400, "unreadable_image"),  # truncated
        (b"", 400, "unreadable_image"),  # empty file
        (TEXT_FILE, 400, "unreadable_image"),  # a text file posted as an image
        (encode(Image.new("RGB", (1, 1))), 422, "unusable_image"),  # 1x1
        (encode(Image.new("L", (32 * 250, 32))), 422, "unusable_image"),  # extreme aspect ratio
        (encode(Image.new("P", (64, 64)), "GIF"), 415, "unsupported_image"),
        (png_bomb(10_000, 10_000), 413, "image_too_large"),  # decompression bomb: 100 Mpx from ~100 kB
    ],
)
def test_bad_images(random_client: TestClient, data: bytes, status: int, code: str) -> None:
    check_error(upload(random_client, data), status, code)


def test_the_file_name_and_declared_type_are_not_trusted(random_client: TestClient) -> None:
    check_error(upload(random_client, TEXT_FILE, filename="scan.png", content_type="image/png"), 400)
    response = upload(random_client, png_bytes(), filename="notes.txt", content_type="text/plain")
    assert response.status_code == 200


def test_empty_body(random_client: TestClient) -> None:
    check_error(random_client.post("/vqa", content=b"", headers={"content-type": "application/json"}), 400)
    check_error(random_client.post("/vqa", content=b""), 415)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "image/png", "application/x-www-form-urlencoded", "application/xml"]
)
def test_wrong_content_type(random_client: TestClient, content_type: str) -> None:
    response = random_client.post("/report", content=png_bytes(), headers={"content-type": content_type})
    check_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"question": "q"}, 422),  # no image
        ({"image": base64.b64encode(png_bytes()).decode()}, 422),  # no question
        ({"image": base64.b64encode(png_bytes()).decode(), "question": ""}, 422),
        ({"image": base64.b64encode(png_bytes()).decode(), "question": "q" * 4001}, 422),
        ({"image": base64.b64encode(png_bytes()).decode(), "question": "q", "qustion": "typo"}, 422),
        ({"image": "not base64 at all!", "question": "q"}, 422),
        ({"image": "data:image/png,rawbytes", "question": "q"}, 422),
        ({"image": 12345, "question": "q"}, 422),
        ({"image": base64.b64encode(png_bytes()).decode(), "question": ["q"]}, 422),
        (["not", "an", "object"], 422),
    ],
)
def test_invalid_json_fields(random_client: TestClient, body: Any, status: int) -> None:
    check_error(random_client.post("/vqa", json=body), status)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"question": "a", "question": "b", "image": "%s"}', "question: given more than once"),
        (b'{"question": "a", "frame": true, "image": "%s"}', "frame: Input should be a valid integer"),
        (
            b'{"question": "a", "max_new_tokens": "3", "image": "%s"}',
            "max_new_tokens: Input should be a valid integer",
        ),
    ],
)
def test_json_is_as_strict_as_multipart(random_client: TestClient, body: bytes, message: str) -> None:
    image = base64.b64encode(png_bytes())
    response = random_client.post("/vqa", content=body % image, headers={"content-type": "application/json"})
    assert check_error(response, 422, "invalid_request")["message"] == message


def test_malformed_json(random_client: TestClient) -> None:
    check_error(
        random_client.post("/vqa", content=b'{"image": ', headers={"content-type": "application/json"}), 400
    )


def test_invalid_multipart_fields(random_client: TestClient) -> None:
    check_error(random_client.post("/vqa", files={"image": ("a.png", png_bytes(), "image/png")}), 422)
    check_error(random_client.post("/vqa", data={"question": "q"}, files={"other": ("a.txt", b"x")}), 422)
    check_error(
        random_client.post("/vqa", data={"question": "q", "image": "a string"}, files={"x": ("a", b"")}), 422
    )
    check_error(
        random_client.post(
            "/ground", files={"image": ("a.png", png_bytes(), "image/png")}, data={"target": "t" * 501}
        ),
        422,
    )


def test_malformed_multipart(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa", content=b"--xyz\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=xyz"}
    )
    assert 400 <= response.status_code < 500
    check_error(response, response.status_code)


def test_declared_body_over_the_limit_is_refused_before_reading(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa", content=b"{}", headers={"content-type": "application/json", "content-length": str(10**12)}
    )
    check_error(response, 413, "payload_too_large")


def test_unknown_route_and_method(random_client: TestClient) -> None:
    check_error(random_client.get("/nope"), 404)
    check_error(random_client.get("/vqa"), 405)


def test_bad_timeout_header(random_client: TestClient) -> None:
    response = random_client.post(
        "/vqa",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"question": "q"},
        headers={"X-Request-Timeout": "-1"},
    )
    check_error(response, 422)
