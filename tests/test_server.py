"""The server as hostile clients meet it: stalled uploads, slow request heads, a full connection cap.

Real processes on loopback and raw sockets, because what is tested here is the server's handling of
connections, below anything an HTTP client library would send.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from bench.servers import RunningServer, free_port, serve
from tests.conftest import png_bytes


def metric(server: RunningServer, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def vqa(server: RunningServer) -> httpx.Response:
    return httpx.post(
        f"{server.url}/vqa",
        files={"image": ("a.png", png_bytes(), "image/png")},
        data={"question": "q"},
        timeout=30,
    )


@contextmanager
def raw_connection(server: RunningServer, port: int | None = None) -> Iterator[socket.socket]:
    host, _, url_port = server.url.removeprefix("http://").partition(":")
    connection = socket.create_connection((host, port or int(url_port)), timeout=10)
    try:
        yield connection
    finally:
        connection.close()


def answer(connection: socket.socket) -> bytes:
    """What the server sends: a response head, or nothing before it closes the connection."""
    received = b""
    while b"\r\n\r\n" not in received and (chunk := connection.recv(65536)):
        received += chunk
    return received


def test_stalled_uploads_hold_no_place_in_the_queue(random_checkpoint: Path, tmp_path: Path) -> None:
    env = {"MEDMO_MAX_QUEUE": "4", "MEDMO_MAX_IMAGES": "4", "MEDMO_VQA_MAX_NEW_TOKENS": "2"}
    with serve(random_checkpoint, tmp_path / "server.log", env=env) as server, ExitStack() as stack:
        body = json.dumps({"question": "q", "image": "iVBORw0KGgo" * 1000}).encode()
        stalled = []
        began = time.monotonic()
        for _ in range(4):  # as many as the queue has places: half a body each, then nothing
            connection = stack.enter_context(raw_connection(server))
            connection.sendall(
                b"POST /vqa HTTP/1.1\r\nHost: medmo\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            stalled.append(connection)
        time.sleep(0.5)
        assert metric(server, "medmo_uploads_in_progress") == 4
        for _ in range(3):
            assert vqa(server).status_code == 200
            assert metric(server, "medmo_queue_depth") == 0
        # Under the minimum rate once its grace has passed: each stalled upload is cut off with 408.
        for connection in stalled:
            assert answer(connection).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - began < 10
        assert metric(server, "medmo_uploads_in_progress") == 0


def test_slow_heads_are_closed_and_probes_answer_while_the_connection_cap_is_full(
    random_checkpoint: Path, tmp_path: Path
) -> None:
    probe_port = free_port()
    env = {"MEDMO_MAX_CONNECTIONS": "4", "MEDMO_HEADER_TIMEOUT_S": "2", "MEDMO_PROBE_PORT": str(probe_port)}
    with serve(random_checkpoint, tmp_path / "server.log", env=env) as server, ExitStack() as stack:
        slow = []
        began = time.monotonic()
        for _ in range(4):  # the whole cap: request heads that never finish
            connection = stack.enter_context(raw_connection(server))
            connection.sendall(b"POST /vqa HTTP/1.1\r\nHost: medmo\r\nX-Slow: ")
            slow.append(connection)
        time.sleep(0.3)
        full = httpx.get(f"{server.url}/healthz", timeout=10)
        assert full.status_code == 503  # the public port is full ...
        probes = f"http://127.0.0.1:{probe_port}"
        assert httpx.get(f"{probes}/healthz", timeout=10).status_code == 200  # ... the probe port is not
        assert httpx.get(f"{probes}/readyz", timeout=10).json() == {"status": "ready"}
        for path in ("/metrics", "/openapi.json", "/info"):  # probes, and nothing else
            assert httpx.get(f"{probes}{path}", timeout=10).status_code == 404
        for connection in slow:
            assert answer(connection) == b""  # closed without an answer
        assert time.monotonic() - began < 2 + 1.5
        assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_a_probe_port_taken_by_another_process_stops_startup(random_checkpoint: Path, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with (
            pytest.raises(RuntimeError, match="exited"),
            serve(
                random_checkpoint,
                tmp_path / "server.log",
                env={"MEDMO_PROBE_PORT": str(port)},
                ready_timeout_s=60,
            ),
        ):
            pass
