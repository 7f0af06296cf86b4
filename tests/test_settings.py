from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.settings import Settings, describe_validation_error


def test_defaults_serve_medmo_8b_next_with_medmo_box_convention() -> None:
    settings = Settings()
    assert settings.model == "MBZUAI/MedMO-8B-Next"
    assert settings.box_convention == "pixel"
    assert settings.device == "auto"
    assert settings.dtype == "auto"


def test_environment_variables_use_the_medmo_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDMO_MODEL", "/models/medmo-4b")
    monkeypatch.setenv("MEDMO_BOX_CONVENTION", "rel1000")
    monkeypatch.setenv("MEDMO_MAX_BATCH_SIZE", "32")
    settings = Settings()
    assert (settings.model, settings.box_convention, settings.max_batch_size) == (
        "/models/medmo-4b",
        "rel1000",
        32,
    )
    assert Settings(model="/override").model == "/override"  # explicit values (CLI flags) win


@pytest.mark.parametrize(
    ("values", "mentions"),
    [
        ({"box_convention": "pixels"}, "MEDMO_BOX_CONVENTION"),
        ({"device": "gpu"}, "MEDMO_DEVICE"),
        ({"max_batch_size": 0}, "MEDMO_MAX_BATCH_SIZE"),
        ({"min_pixels": 10**7, "max_pixels": 10**6}, "MEDMO_MIN_PIXELS"),
        ({"max_wait_ms": 5000, "request_timeout_s": 2}, "MEDMO_MAX_WAIT_MS"),
        ({"max_queue": 4, "max_images": 8}, "MEDMO_MAX_QUEUE (4) is smaller than MEDMO_MAX_IMAGES"),
        ({"allowed_hosts": "medmo.example.org,foo*.bar"}, "MEDMO_ALLOWED_HOSTS"),
        ({"allowed_hosts": "medmo.example.org,,"}, "MEDMO_ALLOWED_HOSTS"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(values: dict[str, object], mentions: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    message = describe_validation_error(caught.value)
    assert mentions in message
    assert "\n" not in message
