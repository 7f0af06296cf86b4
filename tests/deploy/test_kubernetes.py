"""docker/k8s: both overlays render, validate against the Kubernetes API schemas, and say what matters.

kubernetes-validate bundles the API's JSON schemas, so validation runs offline. The PodMonitor (a
Prometheus Operator CRD) and the prometheus-adapter values are not Kubernetes API objects; their
structure is checked by hand. The overlays are rendered by tests/deploy/files.py, and compared with
`kubectl kustomize` where kubectl is installed.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import PurePosixPath
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from prometheus_client import generate_latest

from app.metrics import Metrics
from tests.deploy.files import (
    DOCKERFILES,
    K8S,
    dockerfile_instructions,
    env_of,
    image_env,
    kustomize,
    load_yaml_documents,
    only,
    pod_containers,
    pod_spec,
)

# The newest Kubernetes the bundled schemas cover, and the oldest these manifests are meant for:
# preStop `sleep` and the PDB's unhealthyPodEvictionPolicy are on by default from 1.30 and 1.27 (GA 1.31).
KUBERNETES_VERSIONS = ["1.31.0", "1.37.0"]
OVERLAYS = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
QUEUE_METRIC = "medmo_queue_depth"


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def rendered(overlay: str) -> list[dict[str, Any]]:
    return kustomize(K8S / "overlays" / overlay)


def deployment(documents: list[dict[str, Any]]) -> dict[str, Any]:
    return only(documents, "Deployment")


def server(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec = pod_spec(deployment(documents))
    assert spec is not None
    containers: list[dict[str, Any]] = [c for c in spec["containers"] if c["name"] == "medmo"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number, or the name of one of the container's ports) as a number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], port
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def image_uid(flavour: str) -> int:
    users = [i.arguments for i in dockerfile_instructions(DOCKERFILES[flavour]) if i.keyword == "USER"]
    return int(users[-1].split(":")[0])


# --- schema validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_api_schema(rendered: list[dict[str, Any]], version: str) -> None:
    assert {document["kind"] for document in rendered} == {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }
    for document in rendered:
        # strict: an unknown (misspelt) field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(document, version, strict=True)


def test_validation_rejects_a_broken_manifest(rendered: list[dict[str, Any]]) -> None:
    # The control for the test above: a misspelt field and a wrong type must both be caught.
    misspelt = copy.deepcopy(deployment(rendered))
    misspelt["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)
    wrong_type = copy.deepcopy(deployment(rendered))
    wrong_type["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_rendering_matches_kubectl_kustomize(overlay: str, rendered: list[dict[str, Any]]) -> None:
    output = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    by_kubectl = [document for document in yaml.safe_load_all(output) if document]

    def key(document: dict[str, Any]) -> tuple[str, str]:
        return document["kind"], document["metadata"]["name"]

    assert sorted(by_kubectl, key=key) == sorted(rendered, key=key)


# --- the Deployment -------------------------------------------------------------------------------


def test_gpu_limit_is_the_overlays_vendor_only(overlay: str, rendered: list[dict[str, Any]]) -> None:
    limits = server(rendered)["resources"]["limits"]
    assert limits[OVERLAYS[overlay]] == 1
    others = set(OVERLAYS.values()) - {OVERLAYS[overlay]}
    assert not others & set(limits)
    # The base has no GPU of either vendor: only an overlay is deployable.
    base_limits = server(kustomize(K8S / "base"))["resources"]["limits"]
    assert not set(OVERLAYS.values()) & set(base_limits)


def test_images_are_set_by_the_overlay(overlay: str, rendered: list[dict[str, Any]]) -> None:
    flavour = {"nvidia": "cuda", "amd": "rocm"}[overlay]
    images = {container["image"] for container in pod_containers(deployment(rendered))}
    assert len(images) == 1
    (image,) = images
    assert image.endswith(f"-{flavour}"), image


def test_probes_use_readyz_and_healthz_on_the_probe_port(rendered: list[dict[str, Any]]) -> None:
    container = server(rendered)
    port = int(env_of(container)["MEDMO_PROBE_PORT"])
    assert port == int(image_env("cuda")["MEDMO_PROBE_PORT"])
    assert port != int(env_of(container)["MEDMO_PORT"])
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = container[probe]["httpGet"]
        assert container_port(container, action["port"]) == port, probe
        paths[probe] = action["path"]
    assert paths["readinessProbe"] == "/readyz"
    assert paths["livenessProbe"] == "/healthz"
    # The probe port answers /healthz while the model loads: only /readyz waits for it.
    assert paths["startupProbe"] == "/readyz"


def test_startup_probe_allows_minutes_of_model_loading(rendered: list[dict[str, Any]]) -> None:
    startup = server(rendered)["startupProbe"]
    window = startup["failureThreshold"] * startup["periodSeconds"]
    assert window >= 20 * 60, f"the startup probe gives up after {window} s"


def test_termination_grace_covers_the_drain(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    container = server(rendered)
    drain = float(env_of(container)["MEDMO_SHUTDOWN_GRACE_S"])
    pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > pause + drain


def test_runs_as_the_images_unprivileged_user(overlay: str, rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    flavour = {"nvidia": "cuda", "amd": "rocm"}[overlay]
    # The uid the image's files and the cache volume belong to.
    assert security["runAsUser"] == image_uid(flavour) != 0
    assert security["fsGroup"] == security["runAsGroup"]
    for container in pod_containers(deployment(rendered)):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_amd_pods_join_the_gpu_device_groups(overlay: str, rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    if overlay == "amd":
        assert 44 in spec["securityContext"]["supplementalGroups"]  # video
        assert len(spec["securityContext"]["supplementalGroups"]) == 2  # and render
    else:
        assert "supplementalGroups" not in spec["securityContext"]


def test_no_service_link_variables(rendered: list[dict[str, Any]]) -> None:
    # The Service "medmo" would inject MEDMO_PORT=tcp://... into the pod, which the server reads.
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    assert spec["enableServiceLinks"] is False


def test_hf_cache_is_the_claim_mounted_at_hf_home(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    claim = only(rendered, "PersistentVolumeClaim")
    (volume,) = [
        volume
        for volume in spec["volumes"]
        if volume.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
    ]
    hf_home = image_env("cuda")["HF_HOME"]
    for container in pod_containers(deployment(rendered)):
        assert env_of(container)["HF_HOME"] == hf_home, container["name"]
        mounted = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert mounted[hf_home] == volume["name"], container["name"]
    # Replicas on different nodes share it.
    assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_weights_are_fetched_for_the_model_the_server_loads(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    (fetch,) = spec["initContainers"]
    assert fetch["command"] == ["medmo-serve", "--download-only"]
    assert fetch["image"] == server(rendered)["image"]
    server_env, fetch_env = env_of(server(rendered)), env_of(fetch)
    for name in ("MEDMO_MODEL", "MEDMO_REVISION"):
        assert server_env.get(name) == fetch_env.get(name), name
    # The server then stays offline: the init container did the downloading.
    assert server_env["HF_HUB_OFFLINE"] == "1"


def test_api_keys_come_from_a_secret_mounted_as_a_folder(rendered: list[dict[str, Any]]) -> None:
    spec = pod_spec(deployment(rendered))
    assert spec is not None
    container = server(rendered)
    key_file = PurePosixPath(env_of(container)["MEDMO_API_KEY_FILE"])
    secrets = {volume["name"]: volume["secret"] for volume in spec["volumes"] if "secret" in volume}
    (mount,) = [mount for mount in container["volumeMounts"] if mount["name"] in secrets]
    # A subPath mount is never updated, so a rotated key would need a restart.
    assert "subPath" not in mount
    assert key_file.parent == PurePosixPath(mount["mountPath"])
    assert mount["readOnly"] is True
    secret = secrets[mount["name"]]
    assert secret["secretName"] == "medmo-api-keys"
    assert "items" not in secret or key_file.name in [item["path"] for item in secret["items"]]


# --- Service, disruption budget, autoscaling ------------------------------------------------------


def test_service_and_budget_select_the_pods(rendered: list[dict[str, Any]]) -> None:
    labels = deployment(rendered)["spec"]["template"]["metadata"]["labels"]
    service = only(rendered, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert container_port(server(rendered), port["targetPort"]) == port["port"] == 8000
    budget = only(rendered, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_autoscaler_targets_the_deployment_on_queue_depth(rendered: list[dict[str, Any]]) -> None:
    hpa = only(rendered, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        deployment(rendered)["metadata"]["name"],
    )
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_service_exports_the_metric_the_autoscaler_reads() -> None:
    exposition = generate_latest(Metrics().registry).decode()
    assert f"# TYPE {QUEUE_METRIC} gauge" in exposition


def test_prometheus_adapter_serves_the_metric_per_pod() -> None:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = [rule for rule in values["rules"]["custom"] if QUEUE_METRIC in rule["seriesQuery"]]
    assert len(rules) == 1
    rule = rules[0]
    assert rule["name"]["as"] == QUEUE_METRIC
    # Pods metrics are looked up by namespace and pod: both labels must map to those resources.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.Series>>" in rule["metricsQuery"]
    assert "<<.GroupBy>>" in rule["metricsQuery"]


def test_podmonitor_scrapes_the_pods_metrics_port() -> None:
    # A Prometheus Operator CRD: kubernetes-validate has no schema for it, so its shape is checked here.
    (monitor,) = load_yaml_documents(K8S / "monitoring" / "podmonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "podMetricsEndpoints"}
    documents = kustomize(K8S / "base")
    labels = deployment(documents)["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert container_port(server(documents), endpoint["port"]) == 8000
    assert endpoint["path"] == "/metrics"
