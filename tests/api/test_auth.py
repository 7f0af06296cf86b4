"""API keys: who gets in, how keys are compared, how they rotate."""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import app.api.keys
from app.api.keys import ApiKeys
from app.main import create_app
from app.settings import Settings
from tests.conftest import png_bytes, settings_for

KEY = "k3y-for-the-radiology-gateway-0001"
OTHER_KEY = "k3y-for-the-research-cluster-0002"


@pytest.fixture(scope="module")
def keyed_client(random_checkpoint: Path) -> Iterator[TestClient]:
    settings = settings_for(
        random_checkpoint,
        api_keys=f"{KEY},{OTHER_KEY}",
        vqa_max_new_tokens=2,
        ground_max_new_tokens=2,
        report_max_new_tokens=2,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def call(client: TestClient, path: str, **headers: str) -> int:
    if path == "/info":
        return client.get(path, headers=headers).status_code
    fields = {"question": "q"} if path == "/vqa" else {}
    return client.post(
        path, files={"image": ("a.png", png_bytes(), "image/png")}, data=fields, headers=headers
    ).status_code


@pytest.mark.parametrize("path", ["/vqa", "/report", "/ground", "/info"])
def test_protected_routes_need_a_key_in_either_header(keyed_client: TestClient, path: str) -> None:
    assert call(keyed_client, path) == 401
    assert call(keyed_client, path, Authorization="Bearer wrong-key-but-long-enough") == 401
    assert call(keyed_client, path, **{"X-API-Key": KEY[:-1]}) == 401
    assert call(keyed_client, path, Authorization=f"Basic {KEY}") == 401
    assert call(keyed_client, path, Authorization=f"Bearer {KEY}") == 200
    assert call(keyed_client, path, **{"X-API-Key": OTHER_KEY}) == 200


def test_the_401_has_the_error_shape_and_a_challenge(keyed_client: TestClient) -> None:
    response = keyed_client.post("/vqa", json={"question": "q", "image": ""})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"


def test_refusals_before_the_task_runs_are_counted_per_task(keyed_client: TestClient) -> None:
    def counted(status: int) -> float:
        text = keyed_client.get("/metrics").text
        line = f'medmo_requests_total{{status="{status}",task="report"}} '
        return next((float(row.removeprefix(line)) for row in text.splitlines() if row.startswith(line)), 0.0)

    before_401, before_406 = counted(401), counted(406)
    assert call(keyed_client, "/report") == 401
    wrong_accept = {"Authorization": f"Bearer {KEY}", "Accept": "text/html"}
    assert call(keyed_client, "/report", **wrong_accept) == 406
    assert counted(401) == before_401 + 1
    assert counted(406) == before_406 + 1


def test_probes_and_metrics_stay_open_for_orchestrators(keyed_client: TestClient) -> None:
    assert keyed_client.get("/healthz").status_code == 200
    assert keyed_client.get("/readyz").status_code == 200
    assert keyed_client.get("/metrics").status_code == 200


def test_metrics_can_require_a_key(random_checkpoint: Path) -> None:
    settings = settings_for(random_checkpoint, api_keys=KEY, metrics_require_key=True)
    client = TestClient(create_app(settings))  # the lifespan is not needed for /metrics
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_every_key_is_compared_in_constant_time_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    comparisons: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        comparisons.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(app.api.keys.hmac, "compare_digest", spy)
    keys = ApiKeys([KEY, OTHER_KEY, "a-third-key-nobody-uses-000"], None)
    assert keys.verify(KEY)
    assert len(comparisons) == 3  # the match on the first key did not stop the loop
    comparisons.clear()
    assert not keys.verify("x")
    assert len(comparisons) == 3
    assert all(len(a) == len(b) == 32 for a, b in comparisons)  # digests: equal lengths whatever was sent


def test_keys_rotate_through_the_key_file_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.api.keys, "_RECHECK_FILE_S", 0.0)
    key_file = tmp_path / "keys"
    key_file.write_text(f"# gateway\n{KEY}\n")
    keys = ApiKeys([], key_file)
    assert keys.verify(KEY)
    assert not keys.verify(OTHER_KEY)
    key_file.write_text(f"{OTHER_KEY}\n")
    os.utime(key_file, (1, 1))  # a new modification time, whatever the file system's resolution
    assert keys.verify(OTHER_KEY)
    assert not keys.verify(KEY)
    key_file.write_text("short\n")  # a broken edit keeps the keys loaded before
    os.utime(key_file, (2, 2))
    assert keys.verify(OTHER_KEY)


def test_weak_or_missing_keys_stop_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_keys="password")
    with pytest.raises(ValueError, match="MEDMO_API_KEY_FILE"):
        ApiKeys([], tmp_path / "missing")


def test_an_open_server_says_so_at_startup(random_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="medmo.startup")
    with TestClient(create_app(settings_for(random_checkpoint))):
        pass
    assert any("NO API KEYS CONFIGURED" in record.getMessage() for record in caplog.records)


def test_openapi_declares_both_key_schemes_on_protected_routes(keyed_client: TestClient) -> None:
    schema = keyed_client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Authorization: Bearer <API key>",
    }
    assert schemes["APIKeyHeader"]["in"] == "header"
    assert schemes["APIKeyHeader"]["name"] == "X-API-Key"
    for path, method in [("/vqa", "post"), ("/report", "post"), ("/ground", "post"), ("/info", "get")]:
        assert {"HTTPBearer": []} in schema["paths"][path][method]["security"]
        assert {"APIKeyHeader": []} in schema["paths"][path][method]["security"]
    assert schema["paths"]["/healthz"]["get"]["security"] == []  # declared: no key
