"""Shared fixtures: tiny checkpoints written once per session, images, and apps serving them."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import settings as hypothesis_settings
from PIL import Image
from pydicom.data import get_testdata_file

from app.main import create_app
from app.settings import Settings
from app.tiny_checkpoint import write_checkpoint
from bench.servers import RunningServer, serve

# CI explores the same examples every run, so that a green build stays green; locally they vary.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

# MedMO's README grounding example: what the --reply checkpoints answer in the grounding tests.
README_GROUNDING_REPLY = "Fractures <box>[[156, 516, 231, 607], [240, 529, 296, 581]]</box>"


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights: gibberish text, for pipeline mechanics."""
    return write_checkpoint(tmp_path_factory.mktemp("random-checkpoint"))


@pytest.fixture(scope="session")
def reply_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Checkpoints that answer a chosen text to any prompt, for the parsers."""
    written: dict[str, Path] = {}

    def checkpoint(reply: str) -> Path:
        if reply not in written:
            written[reply] = write_checkpoint(tmp_path_factory.mktemp("reply-checkpoint"), reply=reply)
        return written[reply]

    return checkpoint


def settings_for(model: Path, **overrides: object) -> Settings:
    return Settings(model=str(model), **overrides)  # type: ignore[arg-type]


LIVE_API_KEY = "live-server-key-for-the-tests-0001"


@pytest.fixture(scope="session")
def live_server(random_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """medmo-serve as a real process on loopback, with an API key, debug logs, and short generations."""
    env = {
        "MEDMO_API_KEYS": LIVE_API_KEY,
        "MEDMO_LOG_LEVEL": "debug",
        "MEDMO_VQA_MAX_NEW_TOKENS": "4",
        "MEDMO_REPORT_MAX_NEW_TOKENS": "4",
        "MEDMO_GROUND_MAX_NEW_TOKENS": "4",
    }
    with serve(random_checkpoint, tmp_path_factory.mktemp("live-server") / "server.log", env=env) as server:
        yield server


@pytest.fixture(scope="session")
def random_client(random_checkpoint: Path) -> Iterator[TestClient]:
    """One app serving the random checkpoint for the whole session: the model is loaded once."""
    settings = settings_for(
        random_checkpoint, vqa_max_new_tokens=8, report_max_new_tokens=8, ground_max_new_tokens=8
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def encode(picture: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bytes(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    return encode(rgb_image(width, height, seed))


def png_bomb(width: int, height: int) -> bytes:
    """A small, valid PNG that decodes to width x height grayscale pixels of zeros."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pydicom_file(name: str) -> bytes:
    """A real DICOM file from the test data pydicom ships (none of it written here)."""
    path = get_testdata_file(name)
    assert path is not None, f"{name} is not among pydicom's test files"
    return Path(path).read_bytes()
