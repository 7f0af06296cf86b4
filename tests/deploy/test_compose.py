"""docker/compose.yaml and its ROCm override: parsed as Compose reads them, and wired together.

No Docker engine or Compose binary is needed. Where the compose file meets another file (the images'
HF_HOME, orthanc.json's paths and service URL), the test reads that file, so the two cannot drift.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.files import (
    COMPOSE,
    COMPOSE_ROCM,
    DOCKERFILES,
    ORTHANC_CONFIG,
    REPOSITORY,
    Reset,
    image_env,
    json_without_comments,
    load_compose,
)

COMPOSE_DIR = COMPOSE.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def rocm() -> dict[str, Any]:
    return load_compose(COMPOSE_ROCM)


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", duration)
    assert parts, f"not a duration: {duration}"
    assert "".join(a + u for a, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(amount) * units[unit] for amount, unit in parts)


def environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment is written as a mapping in these files"
    return env


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (volume name or host path), from the short volume syntax."""
    result = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        result[target] = source
    return result


def orthanc_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(json_without_comments(ORTHANC_CONFIG.read_text()))
    return config


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"medmo", "medmo-download", "orthanc"}


def test_medmo_builds_the_cuda_image_from_the_repository(compose: dict[str, Any]) -> None:
    build = compose["services"]["medmo"]["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == REPOSITORY
    assert (REPOSITORY / build["dockerfile"]) == DOCKERFILES["cuda"]
    assert build["args"]["FLASH_ATTENTION"] == "${FLASH_ATTENTION:-false}"


def test_medmo_healthcheck_asks_readyz_on_the_probe_port_and_allows_for_loading(
    compose: dict[str, Any],
) -> None:
    medmo = compose["services"]["medmo"]
    check = medmo["healthcheck"]
    assert check["test"][0] == "CMD"
    urls = [urlsplit(part) for part in check["test"] if part.startswith("http")]
    assert len(urls) == 1
    assert (urls[0].port, urls[0].path) == (8001, "/readyz")
    assert seconds(check["start_period"]) >= 20 * 60
    # The port the check asks is the image's probe port; the public port is the one published.
    assert image_env("cuda")["MEDMO_PROBE_PORT"] == "8001"
    assert image_env("cuda")["MEDMO_PORT"] == "8000"
    assert any(port.endswith(":8000") for port in medmo["ports"])


def test_medmo_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["medmo"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # Without a GPU the server must fail instead of falling back to the CPU.
    assert environment(compose["services"]["medmo"])["MEDMO_DEVICE"] == "cuda"


def test_hf_cache_is_a_named_volume_at_the_images_hf_home(compose: dict[str, Any]) -> None:
    hf_home = image_env("cuda")["HF_HOME"]
    assert hf_home == image_env("rocm")["HF_HOME"]
    volume = mounts(compose["services"]["medmo"])[hf_home]
    assert volume in compose["volumes"]  # named, not a host path: it outlives the container
    # The download step fills the very same cache.
    assert mounts(compose["services"]["medmo-download"])[hf_home] == volume


def test_api_keys_come_from_a_secret_file(compose: dict[str, Any]) -> None:
    medmo = compose["services"]["medmo"]
    key_file = Path(environment(medmo)["MEDMO_API_KEY_FILE"])
    # Compose mounts a service's secret at /run/secrets/<name>.
    assert key_file.parent == Path("/run/secrets")
    assert key_file.name in medmo["secrets"]
    source = Path(compose["secrets"][key_file.name]["file"])
    # Under docker/secrets/, whose .gitignore keeps keys out of git (and .dockerignore out of images).
    assert (COMPOSE_DIR / source).parent.resolve() == (COMPOSE_DIR / "secrets").resolve()
    ignored = (COMPOSE_DIR / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignored


def test_medmo_stops_gracefully_and_restarts(compose: dict[str, Any]) -> None:
    medmo = compose["services"]["medmo"]
    grace = float(environment(medmo)["MEDMO_SHUTDOWN_GRACE_S"])
    # Docker's default 10 s would SIGKILL requests still draining.
    assert seconds(medmo["stop_grace_period"]) > grace
    assert medmo["restart"] in {"unless-stopped", "always", "on-failure"}
    assert medmo["init"] is True


def test_download_step_is_optional_and_runs_first_when_enabled(compose: dict[str, Any]) -> None:
    services = compose["services"]
    download = services["medmo-download"]
    assert download["profiles"] == ["download"]
    assert download["build"] == services["medmo"]["build"]
    assert download["image"] == services["medmo"]["image"]
    # The image's entrypoint is medmo-serve: the step is its prefetch mode.
    assert "entrypoint" not in download
    assert download["command"] == ["--download-only"]
    assert download["restart"] == "no"
    # Both read the operator's settings from the same env file, so they name the same model.
    assert download["env_file"] == services["medmo"]["env_file"]
    assert environment(download)["HF_HUB_OFFLINE"] == "0"
    dependency = services["medmo"]["depends_on"]["medmo-download"]
    assert dependency == {"condition": "service_completed_successfully", "required": False}


def test_orthanc_mounts_the_shipped_configuration_and_script(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    image, _, tag = orthanc["image"].rpartition(":")
    assert image in {"orthancteam/orthanc", "jodogne/orthanc-plugins"}
    assert tag
    assert tag != "latest"
    mounted = mounts(orthanc)
    config = orthanc_config()
    assert (COMPOSE_DIR / mounted["/etc/orthanc/orthanc.json"]).resolve() == ORTHANC_CONFIG
    # The router is mounted where orthanc.json looks for it, with the modules it imports beside it.
    script = Path(config["PythonScript"])
    modules = sorted(path.name for path in ORTHANC_CONFIG.parent.glob("medmo_*.py"))
    assert modules == ["medmo_queue.py", "medmo_router.py", "medmo_routing.py", "medmo_senders.py"]
    for module in modules:
        assert (
            COMPOSE_DIR / mounted[str(script.parent / module)]
        ).resolve() == ORTHANC_CONFIG.parent / module
    assert script.name == "medmo_router.py"
    assert environment(orthanc)["PYTHON_PLUGIN_ENABLED"] == "true"
    assert all(volume.endswith(":ro") for volume in orthanc["volumes"] if volume.startswith("./"))
    # Its own storage, on a named volume at orthanc.json's StorageDirectory.
    assert mounted[config["StorageDirectory"]] in compose["volumes"]
    assert (
        mounted[config["StorageDirectory"]]
        != mounts(compose["services"]["medmo"])[image_env("cuda")["HF_HOME"]]
    )


def test_orthanc_routes_to_medmo_without_waiting_for_it(compose: dict[str, Any]) -> None:
    orthanc = compose["services"]["orthanc"]
    # The PACS takes images while the service loads or restarts; its router's queue waits instead.
    assert "depends_on" not in orthanc
    assert mounts(orthanc)[orthanc_config()["StorageDirectory"]] in compose["volumes"]
    url = urlsplit(orthanc_config()["MedMO"]["Url"])
    # orthanc.json's URL names the compose service and the port the server listens on.
    assert url.hostname in compose["services"]
    assert str(url.port) == image_env("cuda")["MEDMO_PORT"]
    # The API key reaches Orthanc as a JSON secret that its image merges into the configuration.
    (secret,) = orthanc["secrets"]
    assert secret["target"].endswith(".json")
    assert secret["source"] in compose["secrets"]


def test_rocm_override_swaps_the_image_and_passes_the_amd_devices(
    compose: dict[str, Any], rocm: dict[str, Any]
) -> None:
    assert set(rocm["services"]) <= set(compose["services"])
    medmo = rocm["services"]["medmo"]
    assert (REPOSITORY / medmo["build"]["dockerfile"]) == DOCKERFILES["rocm"]
    assert medmo["image"] != compose["services"]["medmo"]["image"]
    assert rocm["services"]["medmo-download"]["build"] == medmo["build"]
    # The NVIDIA reservation is removed, not merged: Docker would refuse to start without that driver.
    assert isinstance(medmo["deploy"], Reset)
    assert {"/dev/kfd", "/dev/dri"} <= set(medmo["devices"])
    groups = [str(group) for group in medmo["group_add"]]
    assert "video" in groups
    assert any("render" in group.lower() for group in groups)
    assert "seccomp=unconfined" in medmo["security_opt"]
