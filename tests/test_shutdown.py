"""SIGTERM on a real process drains every accepted request, whatever it is doing: an upload trickling in,
a fetch from a PACS that trickles, a preview and a request decoding. Each ends within the grace or is cut
short with a 503 in the error shape; none gets a plain-text 500; the process exits 0."""

from __future__ import annotations

import http.server
import io
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench.servers import serve
from tests.conftest import png_bytes

GRACE_S = 4


@pytest.fixture
def trickling_pacs() -> Iterator[str]:
    """A PACS that answers a retrieve with a few bytes a second, for longer than the grace."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
            self.end_headers()
            try:
                self.wfile.write(b"--b\r\nContent-Type: application/dicom\r\n\r\n")
                for _ in range(4 * GRACE_S):
                    self.wfile.write(b"\0" * 8)
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass  # the service gave up on it

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def trickled_upload(url: str, seconds: float) -> tuple[int, str, bytes]:
    """POST /vqa whose body takes `seconds` to arrive; the status, content type and body answered."""
    boundary = "trickle"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\nq\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        ).encode()
        + png_bytes(64, 64)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    address = httpx.URL(url)
    connection = socket.create_connection((address.host, address.port), timeout=60)
    head = (
        f"POST /vqa HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    connection.sendall(head)
    pieces = 20
    size = len(body) // pieces + 1
    try:
        for start in range(0, len(body), size):
            connection.sendall(body[start : start + size])
            time.sleep(seconds / pieces)
    except OSError:
        pass  # answered and closed before the whole body was sent
    answer = b""
    try:
        while chunk := connection.recv(65536):
            answer += chunk
    except OSError:
        pass
    connection.close()
    head_part, _, content = answer.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    content_type = next(
        (line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("content-type")), ""
    )
    return status, content_type, content


def large_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), 90).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sigterm_drains_every_accepted_request_or_cuts_it_short_with_a_json_503(
    random_checkpoint: Path, tmp_path: Path, trickling_pacs: str
) -> None:
    env = {
        "MEDMO_SHUTDOWN_GRACE_S": str(GRACE_S),
        "MEDMO_MIN_UPLOAD_BYTES_PER_S": "1",  # the slow uploads are let in, to be drained
        "MEDMO_DICOMWEB_URL": trickling_pacs,
        "MEDMO_DICOMWEB_TIMEOUT_S": "60",
        "MEDMO_VQA_MAX_NEW_TOKENS": "2",
    }
    with serve(random_checkpoint, tmp_path / "server.log", env=env) as server, ThreadPoolExecutor(8) as pool:
        url = server.url
        within_grace = pool.submit(trickled_upload, url, GRACE_S / 2)
        past_grace = pool.submit(trickled_upload, url, 3 * GRACE_S)
        pacs_fetch = pool.submit(
            httpx.post,
            f"{url}/dicomweb/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/vqa",
            json={"question": "q"},
            timeout=60,
        )
        big = large_png(5000)
        preview = pool.submit(
            httpx.post, f"{url}/preview", files={"image": ("a.png", big, "image/png")}, timeout=60
        )
        decoding = pool.submit(
            httpx.post,
            f"{url}/vqa",
            files={"image": ("a.png", big, "image/png")},
            data={"question": "q"},
            timeout=60,
        )
        time.sleep(1.0)  # all of them accepted and under way
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/readyz").status_code == 503
        late = httpx.post(
            f"{url}/vqa", files={"image": ("a.png", png_bytes(), "image/png")}, data={"question": "q"}
        )
        outcomes = {
            "upload within the grace": within_grace.result()[:2],
            "upload past the grace": past_grace.result()[:2],
            "PACS fetch past the grace": answer(pacs_fetch.result()),
            "preview": answer(preview.result()),
            "request decoding": answer(decoding.result()),
            "request after SIGTERM": answer(late),
        }
        exit_code = server.process.wait(30)
    print(outcomes)
    for name, (status, content_type) in outcomes.items():
        assert status in (200, 503), f"{name}: {status}"
        assert content_type.startswith(("application/json", "image/png")), f"{name}: {content_type}"
    assert outcomes["upload within the grace"][0] == 200
    assert outcomes["upload past the grace"][0] == 503
    assert outcomes["PACS fetch past the grace"][0] == 503
    assert outcomes["request after SIGTERM"][0] == 503
    assert exit_code == 0
    log = (tmp_path / "server.log").read_text()
    assert "Internal Server Error" not in log


def answer(response: httpx.Response) -> tuple[int, str]:
    if response.status_code == 503:
        assert json.loads(response.content)["error"]["code"] == "unavailable"
    return response.status_code, response.headers.get("content-type", "")
