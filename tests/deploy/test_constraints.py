"""docker/constraints.txt: the one list of runtime versions that CI and both images install.

It must pin every runtime dependency (or an image could get a version CI never tested), pin nothing
else that is stale, never pin the torch stack the base images provide, and match what the tests run
with here.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.files import CONSTRAINTS, CONSTRAINTS_IN_IMAGE, DOCKERFILES, REPOSITORY, TORCH_STACK

# Used at run time but declared only by torch (transformers renders chat templates with Jinja2):
# pinned on purpose although the closure below does not reach them.
PINNED_THROUGH_TORCH = {"jinja2", "markupsafe"}


def pins() -> dict[str, str]:
    pinned: dict[str, str] = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9._+!-]+)", line)
        assert match, f"not an exact pin: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pinned, f"{name} is pinned twice"
        pinned[name] = match.group(2)
    return pinned


def runtime_closure() -> set[str]:
    """pyproject's dependencies and theirs, as installed here, not following into the torch stack."""
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    pending = [Requirement(requirement) for requirement in project["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if TORCH_STACK.match(name) or (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        names.add(name)
        try:
            installed = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} (a runtime dependency) is not installed: reinstall the package")
        environments = [{"extra": extra} for extra in requirement.extras] or [{"extra": ""}]
        for declared in installed.requires or []:
            dependency = Requirement(declared)
            if dependency.marker is None or any(dependency.marker.evaluate(env) for env in environments):
                pending.append(dependency)
    return names


def test_every_line_is_an_exact_pin_and_the_torch_stack_is_left_to_the_base_image() -> None:
    pinned = pins()
    assert pinned
    assert not [name for name in pinned if TORCH_STACK.match(name)]


def test_every_runtime_dependency_is_pinned() -> None:
    missing = runtime_closure() - set(pins())
    assert not missing, f"add to {CONSTRAINTS.name} (with the installed versions): {sorted(missing)}"


def test_nothing_is_pinned_that_the_service_does_not_use() -> None:
    stale = set(pins()) - runtime_closure() - PINNED_THROUGH_TORCH
    assert not stale, f"pinned but no longer a runtime dependency: {sorted(stale)}"


def test_the_pins_are_what_the_tests_run_with() -> None:
    # CI installs with this file, so this holds there; locally it says the venv is not what ships.
    differing = {}
    for name, version in pins().items():
        try:
            installed = distribution(name).version
        except PackageNotFoundError:
            installed = "not installed"
        if installed != version:
            differing[name] = f"pinned {version}, installed {installed}"
    assert not differing, differing


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_both_images_install_with_this_file(flavour: str) -> None:
    text = DOCKERFILES[flavour].read_text()
    assert f"COPY {CONSTRAINTS_IN_IMAGE} {CONSTRAINTS_IN_IMAGE}" in text
    assert f"-c {CONSTRAINTS_IN_IMAGE}" in text


@pytest.mark.parametrize("script", ["setup", "setup-tests"])
def test_ci_installs_with_this_file(script: str) -> None:
    # The same pins in CI as in the images: both setups pass the file to their installs of the package.
    setup = (REPOSITORY / ".ci" / script).read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and "-e" in line]
    assert installs, f".ci/{script} no longer installs the package with pip"
    assert all(f"-c {CONSTRAINTS_IN_IMAGE}" in line for line in installs), installs
