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
PROBES = ("/healthz", "/readyz")
TASKS = ("/vqa", "/report", "/ground")


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
        if "examples" not in definition
        and "binary" not in (definition.get("format"), definition.get("items", {}).get("format"))
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
            # Redocly's rule for this is off (tests/ts/redocly.yaml): only the probes have no 4xx.
            if path not in PROBES:
                assert any(status.startswith("4") for status in operation["responses"]), f"{method} {path}"


def test_the_example_image_is_one_the_service_accepts() -> None:
    decoded = decode_image(
        base64.b64decode(EXAMPLE_PNG_BASE64), ImageLimits(max_bytes=10**6, max_pixels=10**6)
    )
    assert (decoded.width, decoded.height) == (32, 32)


def operations(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(path, operation) for path, methods in schema["paths"].items() for operation in methods.values()]


def test_every_operation_declares_its_security(schema: dict[str, Any]) -> None:
    keyed = [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    for path, operation in operations(schema):
        if path in PROBES:
            assert operation["security"] == [], path  # OpenAPI's "no security for this operation"
        elif path == "/metrics":
            assert operation["security"] == [*keyed, {}]  # a key only with MEDMO_METRICS_REQUIRE_KEY
        else:
            assert operation["security"] == keyed, path


def test_servers_are_relative_and_tags_declared_and_described(schema: dict[str, Any]) -> None:
    # Relative: clients call the host they fetched the schema from, never one written into it.
    assert [server["url"] for server in schema["servers"]] == ["/"]
    declared = {tag["name"]: tag.get("description") for tag in schema["tags"]}
    assert all(declared.values()), declared
    used = {tag for _, operation in operations(schema) for tag in operation["tags"]}
    assert used == set(declared)


def test_uploads_are_binary_for_either_generation_of_generators(schema: dict[str, Any]) -> None:
    for path in TASKS:
        body = schema["paths"][path]["post"]["requestBody"]["content"]
        # One part named image per image, as OpenAPI describes repeated parts: an array.
        uploads = component(schema, body["multipart/form-data"]["schema"])["properties"]["image"]
        assert uploads["type"] == "array"
        upload = uploads["items"]
        # OpenAPI 3.1 marks raw bytes with contentMediaType (TypeScript generators); 3.0 with format
        # binary (openapi-python-client).
        assert (upload["type"], upload["format"], upload["contentMediaType"]) == (
            "string",
            "binary",
            "application/octet-stream",
        )
        as_json = component(schema, body["application/json"]["schema"])["properties"]
        for encoded in (as_json["image"], as_json["images"]["items"]["anyOf"][0]):
            assert encoded["contentEncoding"] == "base64"
            assert "contentMediaType" not in encoded
            assert "format" not in encoded
        assert body["application/dicom"]["schema"]["contentMediaType"] == "application/dicom"


def test_a_task_answers_json_first_and_documents_the_dicom_and_stream_alternatives(
    schema: dict[str, Any],
) -> None:
    # The snapshot sorts keys, so it cannot show this order.
    for path in TASKS:
        ok = schema["paths"][path]["post"]["responses"]["200"]
        pictures = ["image/png", "image/jpeg"] if path == "/ground" else []
        assert list(ok["content"]) == [
            "application/json",
            "application/dicom",
            "application/fhir+json",
            "text/event-stream",
            *pictures,
        ]
        assert ok["content"]["application/json"]["schema"]["$ref"].endswith("Response")
        assert ok["content"]["application/dicom"]["schema"]["contentMediaType"] == "application/dicom"
        assert ok["content"]["text/event-stream"]["schema"]["type"] == "string"
        assert "Accept: application/dicom" in ok["description"]
        assert "Accept: application/fhir+json" in ok["description"]
        assert "Accept: text/event-stream" in ok["description"]


def test_optional_request_fields_have_no_null_default(schema: dict[str, Any]) -> None:
    # openapi-typescript reads a default as "always present" and would make callers send every field.
    for path in TASKS:
        for body in schema["paths"][path]["post"]["requestBody"]["content"].values():
            if "$ref" in body["schema"]:
                fields = component(schema, body["schema"])["properties"]
                assert not [name for name, field in fields.items() if "default" in field], path


def component(schema: dict[str, Any], reference: dict[str, str]) -> dict[str, Any]:
    name = reference["$ref"].removeprefix("#/components/schemas/")
    found: dict[str, Any] = schema["components"]["schemas"][name]
    return found
