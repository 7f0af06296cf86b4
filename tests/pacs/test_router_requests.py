"""One request from the Orthanc router to the service (medmo_routing.ask), against a small HTTP server
that answers as scripted: what the router makes of redirects, huge or trickled answers, and refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from medmo_routing import MAX_ANSWER_BYTES, Answer, RouterSettings, ask

from tests.pacs.orthanc import shipped_configuration

Reply = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def service() -> Iterator[tuple[str, list[Reply]]]:
    """A stand-in for the service: each POST gets the next scripted reply; `seen` paths are recorded."""
    replies: list[Reply] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            replies.pop(0)(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", replies
    finally:
        server.shutdown()
        server.server_close()


def send(url: str, timeout_s: float = 5.0) -> Answer:
    configuration = shipped_configuration()
    configuration["MedMO"]["Url"] = url
    settings = replace(RouterSettings.from_configuration(configuration), timeout_s=timeout_s)
    task = settings.modalities["CR"].tasks[0]
    return ask(settings, task, b"\0" * 128 + b"DICM", "orthanc-test-report")


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
