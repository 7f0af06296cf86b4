"""Orthanc's Python plugin script ("PythonScript"): stable series are routed to MedMO Serve.

The glue between Orthanc and the router (`medmo_senders.py`, its queue in `medmo_queue.py`, its rules in
`medmo_routing.py`, all in this folder, which the plugin puts on Python's path): Orthanc's events go in,
its REST API and log are handed over. Each complete series becomes one request per task to MedMO Serve,
holding its chosen images (and, with "Prior", those of the patient's latest earlier study), answered by
one DICOM object filed in its study. `GET /medmo/queue` on Orthanc's own REST API (behind its login)
says what is queued.

Why a Python plugin and not a Lua script: Orthanc 1.10's Lua has no timer (no OnHeartBeat) and its
HttpPost() hides the HTTP status and headers (nil for a 429 as for a refused connection, "" for a 503 as
for a 422), so it can neither wait for a Retry-After nor tell "not now" from "never". The Python plugin
(Debian's orthanc-python, or the orthancteam/orthanc image) runs in Orthanc's process, gets its events,
and has threads and a full HTTP client.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import orthanc  # type: ignore[import-not-found]  # exists only inside Orthanc
from medmo_queue import Queue
from medmo_routing import LOG_PREFIX, ROUTED, ConfigurationError, RouterSettings
from medmo_senders import ResourceGoneError, Router


class PluginOrthanc:
    """Orthanc's REST API from inside (no login, no HTTP) and its log, as the router uses them."""

    def get_json(self, uri: str) -> Any:
        return json.loads(self.get_bytes(uri))

    def get_bytes(self, uri: str) -> bytes:
        try:
            return bytes(orthanc.RestApiGet(uri))
        except orthanc.OrthancException as error:
            if error.args and error.args[0] == orthanc.ErrorCode.UNKNOWN_RESOURCE:
                raise ResourceGoneError(uri) from None
            raise

    def post_json(self, uri: str, body: Any) -> Any:
        return json.loads(bytes(orthanc.RestApiPost(uri, json.dumps(body))))

    def store(self, dicom: bytes) -> str:
        # Through the REST API, like an upload: the answer is filed under its own study, the source's.
        return str(json.loads(orthanc.RestApiPost("/instances", dicom))["ID"])

    def put(self, uri: str, body: str) -> None:
        orthanc.RestApiPut(uri, body)

    def log_info(self, message: str) -> None:
        orthanc.LogInfo(message)

    def log_warning(self, message: str) -> None:
        orthanc.LogWarning(message)


def load() -> Router | None:
    """The router for this configuration, or None (and one error line saying why) if it cannot route."""
    configuration = json.loads(orthanc.GetConfiguration())
    try:
        settings = RouterSettings.from_configuration(configuration)
        if ROUTED not in (configuration.get("UserMetadata") or {}):
            raise ConfigurationError(f'"UserMetadata" must declare "{ROUTED}": the tasks done are kept there')
        queue = Queue(settings.queue_file)
    except (ConfigurationError, OSError, sqlite3.Error) as error:
        orthanc.LogError(f"{LOG_PREFIX}not routing: {error}")
        return None
    return Router(settings, PluginOrthanc(), queue)


ROUTER = load()


def on_change(change_type: int, level: int, resource_id: str) -> None:
    if ROUTER is None:
        return
    if change_type == orthanc.ChangeType.NEW_SERIES or (
        # One more instance in a series seen before (perhaps planned already): noted too, so that a
        # restart before Orthanc calls it stable again does not forget the new instance.
        change_type == orthanc.ChangeType.NEW_CHILD_INSTANCE and level == orthanc.ResourceType.SERIES
    ):
        ROUTER.series_arrived(resource_id)
    elif change_type == orthanc.ChangeType.STABLE_SERIES:
        ROUTER.series_stable(resource_id)
    elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
        # Not before: the plugin may not call Orthanc's database while Orthanc is starting.
        ROUTER.start()
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        ROUTER.stop()


def queue_status(output: Any, uri: str, **request: Any) -> None:
    if request.get("method") != "GET":
        output.SendMethodNotAllowed("GET")
        return
    status = ROUTER.status() if ROUTER is not None else {"routing": False}
    output.AnswerBuffer(json.dumps(status), "application/json")


orthanc.RegisterOnChangeCallback(on_change)
orthanc.RegisterRestCallback("/medmo/queue", queue_status)
