"""`medmo-serve`: validate the configuration, then serve the app (`server.py`: uvicorn, probes, drain)."""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from app.logs import configure_logging
from app.main import create_app
from app.server import run_server
from app.settings import Settings, describe_validation_error


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
