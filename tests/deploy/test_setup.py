"""The serve setup (`.ci/setup`), run the way a new user runs it, on a machine that refuses apt and sudo.

A fresh copy of the repository (the files a clone has: tracked, and new ones git does not ignore) gets
the README's serve command, `bash .ci/setup`, with a PATH where apt-get, sudo, dpkg, npm, node and
Orthanc are stubs that record their call and fail. The setup must succeed without calling any of them,
and the `medmo-serve` it installed must serve; then the package built as a wheel must work installed.

One thing is not installed from nothing: torch. PyPI's torch with its CUDA libraries is 5 GB and a
minute to install, so the test hands the setup the torch this suite runs with, as a machine that
provides torch itself does (a PYTHONPATH entry, as cluster modules set). Everything else the setup
installs for real into a new virtualenv: the package and its runtime dependencies, from the same
package indexes and cache as any install on this machine. CI's clean clone installs torch too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import httpx
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench.servers import serve
from tests.conftest import png_bytes
from tests.deploy.files import REPOSITORY

# Orthanc is left out of PATH instead (it lives in sbin): a setup that wants it must try to install it.
REFUSED = ("apt-get", "apt", "sudo", "su", "dpkg", "npm", "npx", "node", "systemctl", "service")


def copy_of_repository(target: Path) -> None:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPOSITORY / name
        if source.is_file():  # a tracked file deleted in the work tree is not in a clone of it either
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
            (target / name).chmod(source.stat().st_mode)


def refusing_stubs(folder: Path, calls: Path) -> None:
    folder.mkdir()
    for name in REFUSED:
        stub = folder / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        stub.chmod(0o755)


def torch_as_provided(folder: Path) -> None:
    """Links to torch, torchvision and what they depend on, as this suite's environment has them."""
    folder.mkdir()
    pending, seen = ["torch", "torchvision"], set()
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            installed = distribution(name)
        except PackageNotFoundError:
            continue  # an optional dependency that is not installed
        for declared in installed.requires or []:
            requirement = Requirement(declared)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
        site = Path(str(installed.locate_file("")))
        for top in {file.parts[0] for file in installed.files or [] if not file.parts[0].startswith("..")}:
            if (site / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(site / top)


def test_serve_setup_needs_no_apt_or_sudo_and_what_it_installs_serves(
    tmp_path: Path, random_checkpoint: Path
) -> None:
    clone, stubs, calls, provided = (tmp_path / name for name in ("clone", "stubs", "calls", "torch"))
    copy_of_repository(clone)
    assert not (clone / ".venv").exists()
    refusing_stubs(stubs, calls)
    torch_as_provided(provided)
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith(("VIRTUAL_ENV", "PYTHON"))},
        # No sbin (where Orthanc lives), and the stubs first.
        "PATH": f"{stubs}:/usr/local/bin:/usr/bin:/bin",
        "PYTHON": sys._base_executable,  # the Python this suite's virtualenv was made from
        "PYTHONPATH": str(provided),
    }

    setup = subprocess.run(
        ["bash", ".ci/setup"], cwd=clone, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert not calls.exists(), calls.read_text()
    installed = clone / ".venv" / "bin" / "medmo-serve"
    where = subprocess.run(
        [clone / ".venv" / "bin" / "python", "-c", "import app; print(app.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip() == str(clone / "app" / "__init__.py")

    with serve(random_checkpoint, tmp_path / "server.log", env=env, command=[str(installed)]) as server:
        answered = httpx.post(
            f"{server.url}/vqa",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"question": "Is this normal?", "max_new_tokens": "2"},
            timeout=60,
        )
        assert answered.status_code == 200, answered.text
        assert server.terminate() == 0
    assert not calls.exists(), calls.read_text()

    # Publishable: the package as a wheel holds every module and the viewer page's files, and installed
    # from it, works from anywhere.
    venv_python = clone / ".venv" / "bin" / "python"
    pip = [venv_python, "-m", "pip", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", tmp_path / "dist", clone], env=env, check=True, timeout=300
    )
    (wheel,) = (tmp_path / "dist").glob("medmo_serve-*.whl")
    modules = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("app/")}
    shipped = [*(clone / "app").rglob("*.py"), *(clone / "app" / "static" / "viewer").iterdir()]
    assert modules == {path.relative_to(clone).as_posix() for path in shipped}
    subprocess.run(
        [*pip, "install", "--no-deps", "--force-reinstall", wheel], env=env, check=True, timeout=300
    )
    from_wheel = subprocess.run(
        [installed, "--check", "--model", str(random_checkpoint)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert from_wheel.returncode == 0, from_wheel.stdout + from_wheel.stderr
    assert (
        "site-packages"
        in subprocess.run(
            [venv_python, "-c", "import app.main; print(app.main.__file__)"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
