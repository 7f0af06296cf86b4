"""A FHIR server's front door for the tests: it takes `POST /fhir/Bundle` and validates what it receives
as a FHIR R4 Bundle with fhir.resources (R4B), as a server would, answering 400 to anything invalid. Its
answers can be scripted (503 to be retried, a redirect to be refused). No FHIR server installs offline
(HAPI is Java, not on PyPI or in Debian): this validates the bundle for real, and only what the service
sends is under test, not this."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fhir.resources.R4B.bundle import Bundle


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    bundle: dict[str, Any] | None  # None when it did not validate
    problem: str | None = None


@dataclass
class FhirStandIn:
    url: str  # the base, as MEDMO_FHIR_URL
    received: list[Received] = field(default_factory=list)
    # Answers to give, in order, as (status, headers); once spent, 201 with a Location.
    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)


@contextmanager
def fhir_server() -> Iterator[FhirStandIn]:
    state = FhirStandIn(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                bundle = json.loads(body)
                Bundle.model_validate(bundle)
                received = Received(self.path, headers, bundle)
            except Exception as exc:  # what the server would answer 400 to
                received = Received(self.path, headers, None, f"{type(exc).__name__}: {exc}"[:500])
            state.received.append(received)
            if state.script:
                status, extra = state.script.pop(0)
            elif received.bundle is None or self.path != "/fhir/Bundle":
                status, extra = 400, {}
            elif not headers.get("content-type", "").startswith("application/fhir+json"):
                status, extra = 415, {}
            else:
                status, extra = 201, {"Location": f"Bundle/{len(state.received)}/_history/1"}
            self.send_response(status)
            for name, value in {**extra, "Content-Length": "0"}.items():
                self.send_header(name, value)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
