"""The OpenAPI schema is part of the product: generated clients depend on it, so changes are deliberate."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from app.api.openapi import EXAMPLE_PNG_BASE64
from app.imaging import ImageLimits, decode_image
from app.main import create_app
from app.settings import Settings

SNAPSHOT = Path(__file__).parent.parent / "snapshots" / "openapi.json"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return create_app(Settings(model="unused")).openapi()


def test_live_schema_matches_the_committed_snapshot(schema: dict[str, Any]) -> None:
    rendered = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    if os.environ.get("MEDMO_UPDATE_OPENAPI_SNAPSHOT"):
        SNAPSHOT.write_text(rendered)
    assert SNAPSHOT.read_text() == rendered, (
        "the API changed: review the difference, then run "
        "MEDMO_UPDATE_OPENAPI_SNAPSHOT=1 pytest tests/api/test_openapi.py and commit tests/snapshots/openapi.json"
    )


def test_every_field_of_every_model_has_an_example(schema: dict[str, Any]) -> None:
    missing = [
        f"{name}.{field}"
        for name, model in schema["components"]["schemas"].items()
        for field, definition in model.get("properties", {}).items()
        if "examples" not in definition and definition.get("format") != "binary"
    ]
    assert missing == []


def test_every_operation_is_summarised_and_every_error_documented(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method} {path}"
            if path in ("/vqa", "/report", "/ground"):
                assert {"400", "401", "406", "408", "413", "415", "422", "429", "503", "504"} <= set(
                    operation["responses"]
                )


def test_the_example_image_is_one_the_service_accepts() -> None:
    decoded = decode_image(
        base64.b64decode(EXAMPLE_PNG_BASE64), ImageLimits(max_bytes=10**6, max_pixels=10**6)
    )
    assert (decoded.width, decoded.height) == (32, 32)
