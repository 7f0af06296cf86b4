"""The script the images carry besides the package: the health check. (Their download step is
`medmo-serve --download-only`: tests/test_cli.py and tests/startup.)"""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.files import REPOSITORY

HEALTHCHECK = REPOSITORY / "docker" / "healthcheck.py"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Probe:
    """A loopback HTTP server answering every GET with a chosen status, recording the paths asked."""

    def __init__(self) -> None:
        self.status = 200
        self.paths: list[str] = []
        probe = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                probe.paths.append(self.path)
                self.send_response(probe.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def probe() -> Iterator[Probe]:
    server = Probe()
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def healthcheck() -> Callable[[list[str]], int]:
    module = load(HEALTHCHECK)
    main: Callable[[list[str]], int] = module.main
    return main


def test_healthy_only_on_200(probe: Probe, healthcheck: Callable[[list[str]], int]) -> None:
    assert healthcheck(["healthcheck", probe.url("/readyz")]) == 0
    # Loading, draining and a dead worker all answer 503: not healthy.
    probe.status = 503
    assert healthcheck(["healthcheck", probe.url("/readyz")]) == 1


def test_without_an_argument_it_asks_readyz_on_the_probe_port(
    probe: Probe, healthcheck: Callable[[list[str]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDMO_PORT", "1")  # not asked when a probe port is set
    monkeypatch.setenv("MEDMO_PROBE_PORT", str(probe.port))
    assert healthcheck(["healthcheck"]) == 0
    assert probe.paths == ["/readyz"]


def test_without_a_probe_port_it_asks_readyz_on_medmo_port(
    probe: Probe, healthcheck: Callable[[list[str]], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MEDMO_PROBE_PORT", raising=False)
    monkeypatch.setenv("MEDMO_PORT", str(probe.port))
    assert healthcheck(["healthcheck"]) == 0
    assert probe.paths == ["/readyz"]


def test_a_closed_port_is_unhealthy(healthcheck: Callable[[list[str]], int]) -> None:
    # The normal state while the model loads: nothing listens yet.
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    assert healthcheck(["healthcheck", f"http://127.0.0.1:{port}/readyz"]) == 1
