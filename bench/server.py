"""Serve a random-weight model of a chosen shape, built in memory on the device: no checkpoint on disk.

For GPU benchmarks with MedMO-8B's exact shape (compute and memory traffic are the real model's; the text
is meaningless) without writing and reading 17 GB of random weights. Everything else is configured with
MEDMO_* variables, exactly as for medmo-serve, and served by the same code.

    python -m bench.server --shape 8b
"""

from __future__ import annotations

import argparse

from app.engine.runtime import ModelRuntime, Placement
from app.logs import configure_logging
from app.main import create_app
from app.server import run_server
from app.settings import Settings
from app.tiny_checkpoint import SHAPES, build_config, build_model, build_processor, build_tokenizer


def build_runtime(shape: str, settings: Settings) -> ModelRuntime:
    placement = Placement.from_settings(settings)
    tokenizer = build_tokenizer()
    model = build_model(
        build_config(tokenizer, shape),
        dtype=placement.dtype,
        device=placement.device,
        attn_implementation=placement.attention,
    )
    return ModelRuntime.serving(
        model, build_processor(tokenizer), settings, placement, name=f"random-weights:{shape}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    args = parser.parse_args()
    settings = Settings(model=f"random-weights:{args.shape}")
    configure_logging(settings.log_level)
    run_server(create_app(settings, runtime=build_runtime(args.shape, settings)), settings)


if __name__ == "__main__":
    main()
