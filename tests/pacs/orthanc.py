"""Run a real Orthanc (the PACS) on loopback with the shipped configuration and router.

The configuration is docker/orthanc/orthanc.json itself, with only what a test must change overridden:
ports, folders, access from outside, how soon a series counts as stable, and the "MedMO" section. So the
tests exercise the file and the Python router an integrator deploys, and the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from bench.servers import free_port, wait_until_answering

REPOSITORY = Path(__file__).resolve().parents[2]
DOCKER_CONFIG = REPOSITORY / "docker" / "orthanc" / "orthanc.json"
ROUTER_SCRIPT = REPOSITORY / "docker" / "orthanc" / "medmo_router.py"

# Where Debian and Ubuntu install Orthanc and its DICOMweb and Python plugins; ORTHANC and ORTHANC_PLUGINS
# say otherwise (ORTHANC_PLUGINS: a folder holding both plugins, as Orthanc's "Plugins" option accepts).
DEFAULT_BINARY = "/usr/sbin/Orthanc"
DEFAULT_PLUGINS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/share/orthanc/plugins/libOrthancPython.so",
)


def orthanc_binary() -> str | None:
    """The Orthanc executable, or None where it is not installed."""
    configured = os.environ.get("ORTHANC")
    if configured:
        return configured
    return shutil.which("Orthanc") or (DEFAULT_BINARY if Path(DEFAULT_BINARY).exists() else None)


def strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments, which Orthanc's JSON reader accepts and Python's does not.

    Strings are copied untouched: "http://medmo:8000" holds a // that is not a comment.
    """
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[i : end + 1])
            i = end + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def shipped_configuration() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(strip_json_comments(DOCKER_CONFIG.read_text())))


def configuration_for(
    folder: Path,
    http_port: int,
    medmo: Mapping[str, Any],
    stable_age_s: int = 1,
    dicomweb_users: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The shipped configuration, confined to loopback, `folder` and `http_port`, with `medmo` as its
    "MedMO" section. With `dicomweb_users`, its REST API and DICOMweb ask for one of their logins."""
    configuration = shipped_configuration()
    # The shipped file must keep what the tests rely on; a rename there should fail here, loudly.
    assert configuration["PythonScript"] == "/etc/orthanc/medmo_router.py"
    assert configuration["DicomWeb"]["Enable"] is True
    assert {"Url", "ApiKey", "TimeoutSeconds", "Modalities", "Retry"} <= set(configuration["MedMO"])
    assert "MedMORouted" in configuration["UserMetadata"]

    plugins = [os.environ["ORTHANC_PLUGINS"]] if os.environ.get("ORTHANC_PLUGINS") else list(DEFAULT_PLUGINS)
    configuration.update(
        {
            "Name": "MedMO PACS test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "PythonScript": str(ROUTER_SCRIPT),
            "Plugins": plugins,
            "HttpPort": http_port,
            # Nothing but this machine's loopback talks to it; a login only where a test asks for one.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": dicomweb_users is not None,
            "RegisteredUsers": dict(dicomweb_users or {}),
            # Images arrive over REST in the tests; no DICOM port to collide with anything.
            "DicomServerEnabled": False,
            # Series are complete in the tests once their last image is stored: no minute of waiting.
            "StableAge": stable_age_s,
            "MedMO": {**configuration["MedMO"], **medmo},
        }
    )
    return configuration


@dataclass
class RunningOrthanc:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    config_path: Path
    auth: tuple[str, str] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def router_lines(self) -> list[str]:
        """What the router wrote to Orthanc's log."""
        return [line for line in self.log().splitlines() if "MedMO router: " in line]

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise AssertionError(
                f"Orthanc answered {response.status_code} to {response.request.method} "
                f"{response.request.url.path}: {response.text}\n--- Orthanc log ---\n{self.log()}"
            )
        return response

    def get_json(self, path: str) -> Any:
        return self._check(httpx.get(f"{self.url}{path}", auth=self.auth, timeout=30)).json()

    def store(self, dicom: bytes) -> dict[str, Any]:
        """Store a DICOM file the way a client uploads one: its ID, ParentStudy, Status..."""
        response = httpx.post(
            f"{self.url}/instances",
            content=dicom,
            headers={"Content-Type": "application/dicom"},
            auth=self.auth,
            timeout=30,
        )
        return cast(dict[str, Any], self._check(response).json())

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """The instances of an Orthanc study (by Orthanc ID), with their main DICOM tags."""
        return cast(list[dict[str, Any]], self.get_json(f"/studies/{study_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """An instance's DICOM file, as stored."""
        response = httpx.get(f"{self.url}/instances/{instance_id}/file", auth=self.auth, timeout=30)
        return self._check(response).content

    def queue(self) -> dict[str, Any]:
        """The router's GET /medmo/queue: what is queued, and what happened since Orthanc started."""
        return cast(dict[str, Any], self.get_json("/medmo/queue"))

    def wait_for_queue(self, done: Any, timeout_s: float, what: str) -> dict[str, Any]:
        """Poll the router's queue until `done(queue)`; fail with Orthanc's log if it is not in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            queue = self.queue()
            if done(queue):
                return queue
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s} s; queue {queue}\n{self.log()}")
            time.sleep(0.2)

    def wait_for_line(self, text: str, timeout_s: float) -> str:
        """The router's first log line holding `text`, waiting for it; fail with the log if it never comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [line for line in self.router_lines() if text in line]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no router line with {text!r} within {timeout_s} s:\n{self.log()}")
            time.sleep(0.2)

    def restart(self, ready_timeout_s: float = 30) -> None:
        """Stop Orthanc as an operator does (SIGTERM) and start it again on the same folder and port."""
        stop(self.process)
        self.process = launch(self.config_path, self.log_path)
        wait_until_answering(self.process, f"{self.url}/system", self.log_path, ready_timeout_s, self.auth)


def launch(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    binary = orthanc_binary()
    assert binary, "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb orthanc-python)"
    with log_path.open("ab") as log:
        # Orthanc logs to stderr; --verbose adds the HTTP client's errors and the plugins' progress.
        return subprocess.Popen(
            [binary, "--verbose", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=config_path.parent,
        )


@contextmanager
def orthanc(
    folder: Path,
    medmo: Mapping[str, Any],
    stable_age_s: int = 1,
    dicomweb_users: Mapping[str, str] | None = None,
    ready_timeout_s: float = 30,
) -> Iterator[RunningOrthanc]:
    """Start Orthanc with the shipped configuration and router, its "MedMO" section updated with `medmo`;
    stop it after. `folder` (empty, e.g. pytest's tmp_path) receives the configuration, the database,
    the router's queue and the log."""
    port = free_port()
    config_path = folder / "orthanc.json"
    config_path.write_text(
        json.dumps(configuration_for(folder, port, medmo, stable_age_s, dicomweb_users), indent=2)
    )
    log_path = folder / "orthanc.log"
    auth = next(iter(dicomweb_users.items())) if dicomweb_users else None
    running = RunningOrthanc(
        launch(config_path, log_path), f"http://127.0.0.1:{port}", log_path, config_path, auth
    )
    try:
        wait_until_answering(running.process, f"{running.url}/system", log_path, ready_timeout_s, auth)
        yield running
    finally:
        stop(running.process)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM lets Orthanc finish its events and close its SQLite index; kill only if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
