"""`medmo-serve`: validate the configuration, then serve the app (`server.py`: uvicorn, probes, drain).

Two other modes share the configuration and exit: `--download-only` puts the weights into the Hugging Face
cache (the images' and the Kubernetes init container's prefetch), and `--check` checks settings, device,
dtype, attention and weights offline, one line each. Each mode imports what it uses when it runs: a
download does without torch and transformers, which take seconds to import.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from app.logs import configure_logging
from app.settings import Settings, describe_validation_error

CONFIGURATION_ERROR = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="medmo-serve",
        description="Serve MedMO over HTTP. Every option can also be set as a MEDMO_* environment variable.",
    )
    parser.add_argument("--model", help="hub id or local folder (MEDMO_MODEL; default MBZUAI/MedMO-8B-Next)")
    parser.add_argument("--host", help="address to listen on (MEDMO_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (MEDMO_PORT; default 8000)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--download-only",
        action="store_true",
        help="put the model's weights into the Hugging Face cache (HF_HOME), then exit; with "
        "HF_HUB_OFFLINE=1, only check that they are there",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="check settings, device, dtype, attention and weights (offline, nothing is loaded), one line "
        "each, then exit: 0 if all is well",
    )
    args = parser.parse_args(argv)
    overrides = {
        key: getattr(args, key) for key in ("model", "host", "port") if getattr(args, key) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        if args.check:
            print(f"settings: FAILED: {describe_validation_error(exc)}")
        else:
            print(f"medmo-serve: {describe_validation_error(exc)}", file=sys.stderr)
        sys.exit(CONFIGURATION_ERROR)
    configure_logging(settings.log_level)
    if args.check:
        sys.exit(check(settings))
    if args.download_only:
        sys.exit(download(settings))
    serve(settings)


def serve(settings: Settings) -> None:
    from app.main import create_app
    from app.server import run_server

    try:
        app = create_app(settings)
    except ValueError as exc:  # an API key file that cannot be read or holds a weak key
        print(f"medmo-serve: {exc}", file=sys.stderr)
        sys.exit(CONFIGURATION_ERROR)
    run_server(app, settings)


def download(settings: Settings) -> int:
    from app.startup import weights
    from app.startup.progress import StartupProgress

    try:
        checkpoint = weights.resolve(settings, StartupProgress(interval_s=settings.progress_interval_s))
    except weights.WeightsError as exc:
        print(f"medmo-serve: {exc}", file=sys.stderr)
        return 1
    where = "a local folder; nothing to download" if weights.is_local(settings.model) else "in the cache"
    print(f"medmo-serve: {settings.model} is {where}: {weights.describe(checkpoint)}")
    return 0


def check(settings: Settings) -> int:
    from app.startup.checks import run_checks

    checks = run_checks(settings)
    for item in checks:
        print(item.line())
    return 0 if all(item.ok for item in checks) else 1
