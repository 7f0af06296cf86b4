from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import settings_for


def test_probes_when_serving(random_client: TestClient) -> None:
    assert random_client.get("/healthz").json() == {"status": "ok"}
    ready = random_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_not_ready_before_the_lifespan_has_loaded_the_model(random_checkpoint: object) -> None:
    client = TestClient(create_app(settings_for(random_checkpoint)))  # type: ignore[arg-type]
    # Without entering the client, the lifespan (and so the model load) has not run.
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    response = client.post("/vqa", json={"image": "", "question": "q"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"


def test_info_describes_model_device_and_limits(random_client: TestClient) -> None:
    info = random_client.get("/info").json()
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["box_convention"] == "pixel"
    assert info["limits"]["max_new_tokens"] == {"vqa": 8, "report": 8, "ground": 8, "classify": 64}
    assert info["model"].endswith("random-checkpoint0")


def test_openapi_declares_both_request_encodings_and_typed_responses(random_client: TestClient) -> None:
    schema = random_client.get("/openapi.json").json()
    for path, stem in (("/vqa", "Vqa"), ("/report", "Report"), ("/ground", "Ground")):
        operation = schema["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["$ref"] == f"#/components/schemas/{stem}Upload"
        assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{stem}Json"
        ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert ok == f"#/components/schemas/{stem}Response"
        for status in ("400", "413", "415", "422", "429", "503", "504"):
            assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorResponse"
            )
    upload = schema["components"]["schemas"]["GroundUpload"]
    assert upload["properties"]["image"]["items"]["format"] == "binary"
    assert upload["required"] == ["image"]
    assert "target" in upload["properties"]
