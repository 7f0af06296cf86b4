"""Run the server as a real process on a free loopback port, the way an operator starts it.

Used by the benchmarks and by the tests that need a real HTTP server (signals, real clients).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def console_script(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed: pip install -e ."
    return found


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)


def wait_until_answering(
    process: subprocess.Popen[bytes],
    url: str,
    log_path: Path,
    timeout_s: float,
    auth: tuple[str, str] | None = None,
) -> None:
    """Poll `url` until it answers 200; fail with the process's log if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, auth=auth, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s:\n{log_path.read_text()}")
        time.sleep(0.1)


@contextmanager
def serve(
    model: Path | None,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 120,
    command: list[str] | None = None,
    port: int | None = None,
) -> Iterator[RunningServer]:
    """Start `medmo-serve` for `model` (or `command`, configured by MEDMO_* in `env`) and wait until ready.

    On `port` when given (a client configured before the server starts), else on a free one."""
    port = port or free_port()
    environment = {**os.environ, "MEDMO_PORT": str(port), **(env or {})}
    if model is not None:
        environment["MEDMO_MODEL"] = str(model)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command or [console_script("medmo-serve")], env=environment, stdout=log, stderr=subprocess.STDOUT
        )
    server = RunningServer(process=process, url=f"http://127.0.0.1:{port}", log_path=log_path)
    try:
        wait_until_answering(process, f"{server.url}/readyz", log_path, ready_timeout_s)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
