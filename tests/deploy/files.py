"""What the deployment tests read: the repository's deployment files, and small readers for them.

The readers are deliberately narrow. Each one accepts exactly the features the shipped files use and
fails on anything else, so a file that grows a feature they do not understand fails the tests instead
of being checked wrongly.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPOSITORY = Path(__file__).resolve().parents[2]
DOCKERFILES = {
    "cuda": REPOSITORY / "Dockerfile.cuda",
    "rocm": REPOSITORY / "Dockerfile.rocm",
}
CONSTRAINTS = REPOSITORY / "docker" / "constraints.txt"
CONSTRAINTS_IN_IMAGE = "docker/constraints.txt"
COMPOSE = REPOSITORY / "docker" / "compose.yaml"
COMPOSE_ROCM = REPOSITORY / "docker" / "compose.rocm.yaml"
K8S = REPOSITORY / "docker" / "k8s"

# What the base image (or CI's own step) provides and the constraints must never pin.
TORCH_STACK = re.compile(
    r"^(torch|torchvision|torchaudio|triton|pytorch-triton(-rocm)?|nvidia-.*|cuda-.*|rocm.*)$"
)


# --- Dockerfiles --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def dockerfile_instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (no heredocs: none are used)."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, arguments = text.partition(" ")
        assert "<<" not in arguments, f"{path.name}:{start}: heredocs are not understood by these tests"
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    assert not pending, f"{path.name}: ends inside a continued instruction"
    return instructions


def dockerfile_args(instructions: list[Instruction]) -> dict[str, str]:
    args: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.arguments.partition("=")
            args[name] = default
    return args


def image_env(flavour: str) -> dict[str, str]:
    """The ENV values a Dockerfile sets."""
    values: dict[str, str] = {}
    for instruction in dockerfile_instructions(DOCKERFILES[flavour]):
        if instruction.keyword == "ENV":
            for word in shell_words(instruction.arguments):
                name, _, value = word.partition("=")
                values[name] = value
    return values


def exec_form(arguments: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, SHELL)."""
    assert arguments.startswith("["), f"not in exec form: {arguments}"
    parsed = yaml.safe_load(arguments)  # a JSON array is YAML too
    assert isinstance(parsed, list)
    assert all(isinstance(item, str) for item in parsed)
    return parsed


def shell_words(command: str) -> list[str]:
    return shlex.split(command, comments=False, posix=True)


# --- compose ------------------------------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's merge tags: !reset drops a value, !override replaces one."""


def _reset(loader: ComposeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _override(loader: ComposeLoader, node: yaml.Node) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Reset:
    """A `!reset` value: the key is removed from the merged file."""


@dataclass(frozen=True)
class Override:
    """An `!override` value: it replaces the base file's value instead of merging into it."""

    value: Any


ComposeLoader.add_constructor("!reset", _reset)
ComposeLoader.add_constructor("!override", _override)


def load_compose(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader: no arbitrary objects
    assert isinstance(data, dict)
    return data


# --- Kubernetes ---------------------------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
_PATCH_KEYS = {"target", "patch", "path"}
_TARGET_KEYS = {"group", "version", "kind", "name"}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document is not None]
    assert all(isinstance(document, dict) for document in documents), path
    return documents


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization the way `kubectl kustomize` does, for the features the shipped ones use:
    resources (files and other kustomizations), JSON 6902 patches with a target, and image overrides."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: fields these tests cannot render: {sorted(unknown)}"

    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        documents += kustomize(path) if path.is_dir() else load_yaml_documents(path)
    documents = copy.deepcopy(documents)

    for patch in kustomization.get("patches", []):
        assert set(patch) <= _PATCH_KEYS, (
            f"{directory}: unknown patch fields {sorted(set(patch) - _PATCH_KEYS)}"
        )
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        operations = yaml.safe_load(text)
        assert isinstance(operations, list), f"{directory}: only JSON 6902 patches (lists of operations)"
        targets = [document for document in documents if _targeted(document, patch["target"])]
        assert targets, f"{directory}: patch target {patch['target']} matches nothing"
        for document in targets:
            for operation in operations:
                apply_json_patch_operation(document, operation)

    for image in kustomization.get("images", []):
        for document in documents:
            for container in pod_containers(document):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return documents


def _targeted(document: dict[str, Any], target: dict[str, str]) -> bool:
    assert set(target) <= _TARGET_KEYS, f"unknown target fields {sorted(set(target) - _TARGET_KEYS)}"
    group, _, version = document["apiVersion"].rpartition("/")
    wanted = {
        "group": group,
        "version": version,
        "kind": document["kind"],
        "name": document["metadata"]["name"],
    }
    return all(wanted[key] == value for key, value in target.items())


def apply_json_patch_operation(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """RFC 6902 add, replace and remove, with RFC 6901 pointers (~1 is '/', ~0 is '~')."""
    op, path = operation["op"], operation["path"]
    assert op in {"add", "replace", "remove"}, f"operation {op} is not understood by these tests"
    tokens = [token.replace("~1", "/").replace("~0", "~") for token in path.split("/")[1:]]
    parent: Any = document
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        else:
            del parent[index]
        return
    assert isinstance(parent, dict), f"{path}: parent is not an object"
    if op in {"replace", "remove"}:
        assert last in parent, f"{op} {path}: no such member"
    if op == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(operation["value"])


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    if document["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        spec: dict[str, Any] = document["spec"]["template"]["spec"]
        return spec
    return None


def pod_containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(document)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def only(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [document for document in documents if document["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    variables: dict[str, str] = {}
    for variable in container.get("env", []):
        assert "value" in variable, f"{variable['name']}: only literal values are read by these tests"
        variables[variable["name"]] = variable["value"]
    return variables


# --- Orthanc ------------------------------------------------------------------------------------------

ORTHANC_CONFIG = REPOSITORY / "docker" / "orthanc" / "orthanc.json"


def json_without_comments(text: str) -> str:
    """Orthanc's configuration is JSON with // and /* */ comments; strings (URLs) keep their slashes."""
    pattern = re.compile(r'"(?:\\.|[^"\\])*"|//[^\n]*|/\*.*?\*/', re.DOTALL)
    return pattern.sub(lambda match: match.group(0) if match.group(0).startswith('"') else "", text)
