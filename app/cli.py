"""`medmo-serve`: validate the configuration, then serve the app with uvicorn.

SIGTERM (what orchestrators send) drains: /readyz and new requests answer 503 while accepted requests
finish, for up to MEDMO_SHUTDOWN_GRACE_S; then the server exits. A second signal, or Ctrl-C, exits at once
after the requests in progress.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from app.logs import configure_logging
from app.main import create_app, drain
from app.settings import Settings, describe_validation_error

STARTUP_FAILURE = 3


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self.draining: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started and self.draining is None and self.loop is not None:
            self.loop.call_soon_threadsafe(self._begin_drain)
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self.draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await drain(self.app, self.grace_s)
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="medmo-serve",
        description="Serve MedMO over HTTP. Every option can also be set as a MEDMO_* environment variable.",
    )
    parser.add_argument("--model", help="hub id or local folder (MEDMO_MODEL; default MBZUAI/MedMO-8B-Next)")
    parser.add_argument("--host", help="address to listen on (MEDMO_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (MEDMO_PORT; default 8000)")
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if value is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"medmo-serve: {describe_validation_error(exc)}", file=sys.stderr)
        sys.exit(2)
    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except ValueError as exc:  # an API key file that cannot be read or holds a weak key
        print(f"medmo-serve: {exc}", file=sys.stderr)
        sys.exit(2)
    run_server(app, settings)


def run_server(app: FastAPI, settings: Settings) -> None:
    """Serve `app` with uvicorn until SIGTERM has drained it (or a second signal); exit 3 if it never started."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=15,
        limit_concurrency=settings.max_connections,
    )
    server = DrainingServer(config, app, settings.shutdown_grace_s)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
