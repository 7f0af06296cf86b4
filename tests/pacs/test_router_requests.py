"""One request from the Orthanc router to the service (medmo_routing.ask), against a small HTTP server
that answers as scripted: the multipart body the service reads (images in order, captions, the task's
fields), and what the router makes of redirects, huge or trickled answers, and refusals."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from medmo_routing import MAX_ANSWER_BYTES, Answer, RouterSettings, Upload, ask
from python_multipart import parse_form
from python_multipart.multipart import Field, File

from tests.pacs.orthanc import shipped_configuration

Reply = Callable[[BaseHTTPRequestHandler], None]
DICOM_FILE = b"\0" * 128 + b"DICM"


@dataclass(frozen=True)
class Received:
    """A request as the stand-in received it."""

    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


def form_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """A multipart/form-data body's parts in order, (name, content), read by python-multipart (the parser
    behind the service's own Starlette), not by the code that wrote it."""
    parts: list[tuple[str, bytes]] = []

    def on_field(field: Field) -> None:
        parts.append((field.field_name.decode(), field.value or b""))

    def on_file(file: File) -> None:
        file.file_object.seek(0)
        parts.append((file.field_name.decode() if file.field_name else "", file.file_object.read()))

    parse_form(
        {"Content-Type": content_type.encode(), "Content-Length": str(len(body)).encode()},
        io.BytesIO(body),
        on_field,
        on_file,
    )
    return parts


@pytest.fixture
def service() -> Iterator[tuple[str, list[Reply]]]:
    """A stand-in for the service: each POST gets the next scripted reply."""
    with scripted_service() as (url, replies, _):
        yield url, replies


@contextmanager
def scripted_service() -> Iterator[tuple[str, list[Reply], list[Received]]]:
    """A stand-in for the service at a URL: each POST gets the next of the scripted replies, and is
    recorded as received."""
    replies: list[Reply] = []
    received: list[Received] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(
                Received(self.path, {name.lower(): value for name, value in self.headers.items()}, body)
            )
            replies.pop(0)(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", replies, received
    finally:
        server.shutdown()
        server.server_close()


def settings_for(url: str, timeout_s: float = 5.0) -> RouterSettings:
    configuration = shipped_configuration()
    configuration["MedMO"]["Url"] = url
    configuration["MedMO"]["Questions"] = {"effusion": "Is there a pleural effusion?"}
    configuration["MedMO"]["Modalities"]["CR"]["Tasks"].append("vqa:effusion")
    return replace(RouterSettings.from_configuration(configuration), timeout_s=timeout_s)


def send(url: str, timeout_s: float = 5.0) -> Answer:
    settings = settings_for(url, timeout_s)
    task = settings.modalities["CR"].tasks[0]
    return ask(settings, task, [Upload(DICOM_FILE)], "orthanc-test-report")


def test_the_images_go_in_order_as_a_form_with_their_captions_and_the_question() -> None:
    captions = ("current, 2025-03-12, PA", "current, 2025-03-12, LL", "prior, 2024-01-05, PA")
    images = [Upload(DICOM_FILE + bytes([number]), text) for number, text in enumerate(captions)]
    with scripted_service() as (url, replies, received):
        replies.append(status(200, body=DICOM_FILE))
        settings = settings_for(url)
        vqa = settings.modalities["CR"].tasks[-1]
        answer = ask(settings, vqa, images, "orthanc-0123-vqa:effusion")
    assert answer.status == 200
    (request,) = received
    # The question in the form: with a multipart body, the service refuses a query string.
    assert request.path == "/vqa"
    assert request.headers["accept"] == "application/dicom"
    assert request.headers["x-request-id"] == "orthanc-0123-vqa:effusion"
    assert request.headers["x-priority"] == "routine"  # unless the series' study says otherwise
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert form_parts(request.headers["content-type"], request.body) == [
        ("image", DICOM_FILE + b"\0"),
        ("image", DICOM_FILE + b"\1"),
        ("image", DICOM_FILE + b"\2"),
        *(("caption", text.encode()) for text in captions),
        ("question", b"Is there a pleural effusion?"),
    ]


def test_images_without_captions_go_without_caption_fields() -> None:
    with scripted_service() as (url, replies, received):
        replies.append(status(200, body=DICOM_FILE))
        settings = settings_for(url)
        ask(settings, settings.modalities["CR"].tasks[0], [Upload(DICOM_FILE), Upload(DICOM_FILE)], "id")
    (request,) = received
    assert request.path == "/report"
    assert [name for name, _ in form_parts(request.headers["content-type"], request.body)] == [
        "image",
        "image",
    ]


def status(code: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(code)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return reply


def test_a_redirect_is_an_answer_not_somewhere_to_send_the_image_and_the_key(
    service: tuple[str, list[Reply]],
) -> None:
    url, replies = service
    replies += [status(307, {"Location": f"{url}/elsewhere"}), status(200, body=b"\0" * 200)]
    answer = send(url)
    assert answer.status == 307
    assert not answer.retryable
    assert len(replies) == 1  # the redirect was not followed


@pytest.mark.parametrize("code", [401, 403, 404])
def test_a_refused_key_or_a_wrong_url_waits_for_the_configuration_to_be_fixed(
    service: tuple[str, list[Reply]], code: int
) -> None:
    url, replies = service
    replies.append(status(code))
    assert send(url).retryable


def test_a_refusal_of_the_image_is_final(service: tuple[str, list[Reply]]) -> None:
    url, replies = service
    replies.append(status(422, body=b'{"error": {"code": "unusable_image", "message": "..."}}'))
    answer = send(url)
    assert (answer.status, answer.retryable, answer.problem) == (422, False, "unusable_image")


def test_an_answer_over_the_limit_is_not_taken_for_a_short_one(service: tuple[str, list[Reply]]) -> None:
    url, replies = service

    def huge(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(MAX_ANSWER_BYTES + 1024))
        handler.end_headers()
        chunk = b"\0" * 128 + b"DICM" + b"\0" * (1024 * 1024 - 132)
        try:
            for _ in range(MAX_ANSWER_BYTES // len(chunk) + 1):
                handler.wfile.write(chunk)
        except OSError:
            pass  # the router hung up, as it should

    replies.append(huge)
    answer = send(url)
    assert answer.status == 200
    assert answer.body == b""
    assert "over" in answer.problem


def test_an_answer_trickled_past_the_timeout_is_given_up_at_the_timeout(
    service: tuple[str, list[Reply]],
) -> None:
    url, replies = service

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        try:
            for _ in range(100):
                handler.wfile.write(b"\0")
                handler.wfile.flush()
                time.sleep(0.1)  # each byte well within the socket timeout
        except OSError:
            pass

    replies.append(trickle)
    began = time.monotonic()
    answer = send(url, timeout_s=1.0)
    assert answer.status is None
    assert answer.retryable
    assert 1.0 <= time.monotonic() - began < 2.5
