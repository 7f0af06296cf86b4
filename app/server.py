"""The HTTP server around the app: uvicorn, with the connection discipline a hospital network needs.

- **Request heads are timed out.** uvicorn closes idle keep-alive connections but waits forever for a
  request head that never completes, so a few clients that open connections and trickle header bytes hold
  the connection cap (MEDMO_MAX_CONNECTIONS) indefinitely. Its HTTP protocol is subclassed to close a
  connection whose head has not arrived within MEDMO_HEADER_TIMEOUT_S (uvicorn takes a protocol class for
  exactly this kind of change).
- **Probes have a port of their own** (MEDMO_PROBE_PORT): a second uvicorn server in the same process and
  event loop answers only /healthz and /readyz, with its own connections. When the public port is full,
  the orchestrator still sees a live process, and does not restart a pod that is merely busy.
- **SIGTERM drains**: /readyz and new requests answer 503 while accepted requests finish, for up to
  MEDMO_SHUTDOWN_GRACE_S; then both servers exit. A second signal, or Ctrl-C, exits at once after the
  requests in progress. During startup any of them ends the process at once (see handle_exit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.main import create_probe_app, drain
from app.settings import Settings

STARTUP_FAILURE = 3
# The probe server's own cap: orchestrators open a few connections at a time.
PROBE_CONNECTIONS = 32

logger = logging.getLogger("medmo.server")


def head_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing connections whose request head is not complete in time."""

    class HeadTimeoutProtocol(HttpToolsProtocol):
        head_timer: asyncio.TimerHandle | None = None
        awaiting_head = True

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a byte is cut off too

        def data_received(self, data: bytes) -> None:
            if self.awaiting_head and self.head_timer is None:
                self._arm()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.awaiting_head = False
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request's head is timed from its first byte; until then, uvicorn's keep-alive
            # timeout governs the idle connection.
            self.awaiting_head = True

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self.head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.awaiting_head and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol


class ProbeServer(uvicorn.Server):
    """The probe port's server: it runs beside the main one and leaves signals to it."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, app: FastAPI, grace_s: float, probes: ProbeServer | None
    ) -> None:
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self.probes = probes
        self.draining: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        probing = asyncio.create_task(self.probes.serve()) if self.probes is not None else None
        try:
            await super().serve(sockets)
        finally:
            if self.probes is not None and probing is not None:
                self.probes.should_exit = True
                await probing

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.started:
            # Still downloading, loading or warming up, in a thread no signal can stop: uvicorn would wait
            # for it (minutes, or the whole download). Nothing has been accepted yet, and a download resumes
            # from its partial files, so the process ends now.
            state = getattr(self.app.state, "service", None)
            phase = state.startup.state if state is not None else None
            doing = phase.phase.value.replace("_", " ") if phase is not None else "starting"
            logger.warning("stopped by %s while %s", signal.Signals(sig).name, doing)
            logging.shutdown()
            os._exit(128 + sig)
        if sig == signal.SIGTERM and self.draining is None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._begin_drain)
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self.draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await drain(self.app, self.grace_s)
        self.should_exit = True


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve `app` with uvicorn until SIGTERM has drained it (or a second signal); exit 3 if it never started."""
    protocol = head_timeout_protocol(settings.header_timeout_s)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=15,
        limit_concurrency=settings.max_connections,
    )
    probes = None
    if settings.probe_port is not None:
        probe_config = uvicorn.Config(
            create_probe_app(app),
            host=settings.host,
            port=settings.probe_port,
            http=protocol,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=15,
            limit_concurrency=PROBE_CONNECTIONS,
        )
        probes = ProbeServer(probe_config)
    server = DrainingServer(config, app, settings.shutdown_grace_s, probes)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
