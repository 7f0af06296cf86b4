"""The service's DICOMweb client on its own: what a PACS answers to a store (STOW-RS), where a body it
cannot read is the PACS's failure (PacsError, a 502 for the client) whatever its shape; and the login file,
turned into an Authorization header or refused without echoing it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.pacs.dicomweb import DICOM_JSON, Dicomweb, PacsError, PacsSettings, read_credentials

SR = "1.2.840.10008.5.1.4.1.1.88.33"


def confirmation(**elements: Any) -> bytes:
    return json.dumps(elements).encode()


ANSWERS = {
    "a JSON array": (200, b"[]"),
    "a number": (200, b"7"),
    "not JSON": (200, b"<html>stored</html>"),
    "not UTF-8": (200, b"\xff\xfe{}"),
    "a failure without its reason": (
        409,
        confirmation(**{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US"}}]}}),
    ),
    "a failure sequence of the wrong type": (
        409,
        confirmation(**{"00081198": {"vr": "UI", "Value": ["1.2"]}}),
    ),
    "a confirmation of nothing": (200, confirmation(**{"00081199": {"vr": "SQ", "Value": []}})),
}


@pytest.fixture
def scripted() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """A PACS that answers each store with the next scripted status and body."""
    script: list[tuple[int, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body = script.pop(0)
            self.send_response(status)
            self.send_header("Content-Type", DICOM_JSON)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web", script
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("answer", sorted(ANSWERS))
async def test_a_store_answer_that_cannot_be_read_is_the_pacss_failure(
    scripted: tuple[str, list[tuple[int, bytes]]], answer: str
) -> None:
    url, script = scripted
    script.append(ANSWERS[answer])
    pacs = Dicomweb(
        PacsSettings(url=url, credentials_file=None, timeout_s=5, retries=0, max_instance_bytes=1 << 20)
    )
    with pytest.raises(PacsError):
        await pacs.store("1.2.3", [b"\0" * 132])


@pytest.mark.parametrize(
    ("content", "header"),
    [
        ("# the PACS's login\nmedmo:pässword\n", "Basic bWVkbW86cMOkc3N3b3Jk"),
        ("Bearer abc.DEF-123\n", "Bearer abc.DEF-123"),
    ],
)
def test_a_credentials_file_becomes_the_authorization_header(
    tmp_path: Path, content: str, header: str
) -> None:
    path = tmp_path / "login"
    path.write_text(content, encoding="utf-8")
    assert read_credentials(path) == header


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        ("Bearer tökén\n", "tökén"),
        ("Bearer a\tb\n", "a\tb"),
        ("hunter2\n", "hunter2"),
        (":hunter2\n", "hunter2"),
    ],
)
def test_a_credentials_file_an_http_header_cannot_carry_is_refused_without_echoing_it(
    tmp_path: Path, content: str, secret: str
) -> None:
    path = tmp_path / "login"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="PACS credentials file") as refused:
        read_credentials(path)
    assert secret not in str(refused.value)
