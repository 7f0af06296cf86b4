"""Run a real Orthanc (the PACS) on loopback with the shipped configuration and autorouting script.

The configuration is docker/orthanc/orthanc.json itself, with only what a test must change overridden:
ports, folders, access from outside, and where the "MedMO" section points. So the tests exercise the
file and the Lua script an integrator deploys, and the two cannot drift apart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx

from bench.servers import free_port, wait_until_answering

REPOSITORY = Path(__file__).resolve().parents[2]
DOCKER_CONFIG = REPOSITORY / "docker" / "orthanc" / "orthanc.json"
AUTOROUTE_SCRIPT = REPOSITORY / "docker" / "orthanc" / "autoroute.lua"

# Where Debian and Ubuntu install Orthanc and its DICOMweb plugin; ORTHANC and ORTHANC_PLUGINS say
# otherwise (a plugin file or a folder of plugins, as Orthanc's "Plugins" option accepts).
DEFAULT_BINARY = "/usr/sbin/Orthanc"
DEFAULT_DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


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
    medmo_url: str,
    tasks: Sequence[str],
    api_key: str = "",
    timeout_s: int = 60,
) -> dict[str, Any]:
    """The shipped configuration, confined to loopback, `folder` and `http_port`, routing to `medmo_url`."""
    configuration = shipped_configuration()
    # The shipped file must keep what the tests rely on; a rename there should fail here, loudly.
    assert configuration["LuaScripts"] == ["/etc/orthanc/autoroute.lua"]
    assert configuration["DicomWeb"]["Enable"] is True
    assert set(configuration["MedMO"]) == {"Url", "Tasks", "ApiKey", "TimeoutSeconds"}
    assert "MedMORouted" in configuration["UserMetadata"]

    plugins = os.environ.get("ORTHANC_PLUGINS") or DEFAULT_DICOMWEB_PLUGIN
    configuration.update(
        {
            "Name": "MedMO PACS test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "LuaScripts": [str(AUTOROUTE_SCRIPT)],
            "Plugins": [plugins],
            "HttpPort": http_port,
            # Nothing but this machine's loopback talks to it, so no login is needed.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            # Images arrive over REST in the tests; no DICOM port to collide with anything.
            "DicomServerEnabled": False,
            "HttpTimeout": timeout_s,
            "MedMO": {"Url": medmo_url, "Tasks": list(tasks), "ApiKey": api_key, "TimeoutSeconds": timeout_s},
        }
    )
    return configuration


@dataclass
class RunningOrthanc:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            raise AssertionError(
                f"Orthanc answered {response.status_code} to {response.request.method} "
                f"{response.request.url.path}: {response.text}\n--- Orthanc log ---\n{self.log()}"
            )
        return response

    def get_json(self, path: str) -> Any:
        return self._check(httpx.get(f"{self.url}{path}", timeout=30)).json()

    def store(self, dicom: bytes) -> dict[str, Any]:
        """Store a DICOM file the way a client uploads one: its ID, ParentStudy, Status..."""
        response = httpx.post(
            f"{self.url}/instances", content=dicom, headers={"Content-Type": "application/dicom"}, timeout=30
        )
        return cast(dict[str, Any], self._check(response).json())

    def study_instances(self, study_id: str) -> list[dict[str, Any]]:
        """The instances of an Orthanc study (by Orthanc ID), with their main DICOM tags."""
        return cast(list[dict[str, Any]], self.get_json(f"/studies/{study_id}/instances"))

    def instance_file(self, instance_id: str) -> bytes:
        """An instance's DICOM file, as stored."""
        return self._check(httpx.get(f"{self.url}/instances/{instance_id}/file", timeout=30)).content


@contextmanager
def orthanc(
    folder: Path,
    medmo_url: str,
    tasks: Sequence[str] = ("report", "ground"),
    api_key: str = "",
    timeout_s: int = 60,
    ready_timeout_s: float = 30,
) -> Iterator[RunningOrthanc]:
    """Start Orthanc with the shipped configuration and script, routing to `medmo_url`; stop it after.

    `folder` (empty, e.g. pytest's tmp_path) receives the configuration, the database and the log.
    """
    binary = orthanc_binary()
    assert binary, "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb, or set ORTHANC)"
    port = free_port()
    config_path = folder / "orthanc.json"
    config_path.write_text(
        json.dumps(configuration_for(folder, port, medmo_url, tasks, api_key, timeout_s), indent=2)
    )
    log_path = folder / "orthanc.log"
    with log_path.open("wb") as log:
        # Orthanc logs to stderr; --verbose adds the HTTP client's errors and the plugin's progress.
        process = subprocess.Popen(
            [binary, "--verbose", str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
        )
    running = RunningOrthanc(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:
        wait_until_answering(process, f"{running.url}/system", log_path, ready_timeout_s)
        yield running
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM lets Orthanc finish its Lua event and close its SQLite index; kill only if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
