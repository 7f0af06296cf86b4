"""Series-level routing from Orthanc to MedMO Serve: the rules.

Orthanc's Python plugin runs `medmo_router.py`, which hands Orthanc's events and REST API to the senders
(`medmo_senders.py`, their queue in `medmo_queue.py`); this module holds what they decide with: the
"MedMO" settings, the tasks, which instances of a series to send, and one request to the service with
what its answer means. Standard library only: the plugin runs Debian's or the Orthanc image's
interpreter, not the service's virtual environment. Apart from `medmo_router.py`, nothing here imports
Orthanc's module, so it is tested outside Orthanc as well as inside (the Orthanc book's advice for
Python plugins).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LOG_PREFIX = "MedMO router: "
# Where the tasks done for an instance are recorded (declared in orthanc.json's "UserMetadata").
ROUTED = "MedMORouted"

# Cross-sectional series are stacks of slices through one volume: one slice (or a few) stands for the
# series. Any other modality (CR, DX, MG, US, XA, ...) is projection imaging, each instance a view of its
# own, and every instance is sent.
CROSS_SECTIONAL = frozenset({"CT", "MR", "PT", "NM"})
# Objects that are not images: nothing to look at, and SRs and presentation states are what the service
# writes, so routing them would loop.
NOT_IMAGES = frozenset({"SR", "KO", "PR", "SEG", "DOC", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG"})

# Answers that say "not now": the service is overloaded (429), not ready or draining (503), a proxy in
# front of it failed (502, 504), the request timed out on the way (408), or the model failed this
# request (500, worth another try on a fresh batch). And answers that say the router is misconfigured
# (401, 403: the key; 404: the URL): every image would get them, and dropping the whole queue for a typo
# would lose it; it waits instead, and sends once the configuration is fixed. Any other status is the
# service's final word on that image.
RETRYABLE = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})
# The hint for the log line when every image would get that status: the router's settings, not the service.
MISCONFIGURED = {
    401: " (the service refused MedMO.ApiKey)",
    403: " (the service refused MedMO.ApiKey)",
    404: " (MedMO.Url does not lead to the service)",
}
# A Structured Report or presentation state is kilobytes; anything near this is not one.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# A service asking for more than a day is misconfigured; waiting longer would look like a hang.
MAX_RETRY_AFTER_S = 86_400.0
_TASK_NAME = re.compile(r"[a-z]+(:[A-Za-z0-9_-]+)?")
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


class ConfigurationError(ValueError):
    """The "MedMO" section cannot be used; the message names the setting."""


# --- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One configured task: the route it calls and what it asks for."""

    name: str  # as configured, recorded in the metadata and logged: report, ground:gsps, vqa:effusion
    route: str  # report, ground, vqa
    accept: str  # the DICOM object wanted back
    question: str | None = None  # vqa: the fixed question, sent in the query string

    def url(self, base_url: str) -> str:
        query = "?" + urllib.parse.urlencode({"question": self.question}) if self.question else ""
        return f"{base_url}/{self.route}{query}"


@dataclass(frozen=True)
class ModalityRule:
    tasks: tuple[Task, ...]
    # Instances sent per series: None for every instance, else that many slices evenly spaced by position.
    instances: int | None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 20
    first_delay_s: float = 10.0
    max_delay_s: float = 600.0

    def delay(self, failures: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait after the `failures`-th failure in a row: doubling from the first delay up to the
        cap, and never less than the service's Retry-After."""
        backoff = min(self.max_delay_s, self.first_delay_s * 2.0 ** min(max(0, failures - 1), 60))
        return max(backoff, min(retry_after_s or 0.0, MAX_RETRY_AFTER_S))


@dataclass(frozen=True)
class RouterSettings:
    url: str
    api_key: str
    timeout_s: float
    modalities: Mapping[str, ModalityRule]
    retry: RetryPolicy
    queue_file: str
    senders: int
    stable_age_s: float

    @classmethod
    def from_configuration(cls, configuration: Mapping[str, Any]) -> RouterSettings:
        """Read Orthanc's whole configuration; raise ConfigurationError naming what is wrong."""
        section = configuration.get("MedMO")
        if not isinstance(section, Mapping):
            raise ConfigurationError('no "MedMO" section in the configuration')
        url = section.get("Url")
        if not isinstance(url, str) or not re.fullmatch(r"https?://[^\s/?#@]+(/[^\s?#]*)?", url):
            # No login in it either: the URL is logged, and the key goes in "ApiKey".
            raise ConfigurationError(
                '"MedMO.Url" must be the service\'s http(s) base URL, without a login (the key goes in '
                '"MedMO.ApiKey")'
            )
        api_key = section.get("ApiKey", "")
        if not isinstance(api_key, str):
            raise ConfigurationError('"MedMO.ApiKey" must be a string')
        questions = section.get("Questions", {})
        if not isinstance(questions, Mapping) or not all(
            isinstance(text, str) and text.strip() for text in questions.values()
        ):
            raise ConfigurationError('"MedMO.Questions" must map names to questions')
        modalities = section.get("Modalities")
        if not isinstance(modalities, Mapping):
            raise ConfigurationError('"MedMO.Modalities" must map modalities (CR, CT, ...) to their rules')
        retry = section.get("Retry", {})
        if not isinstance(retry, Mapping):
            raise ConfigurationError('"MedMO.Retry" must be an object')
        return cls(
            url=url.rstrip("/"),
            api_key=api_key,
            timeout_s=_number(section, "TimeoutSeconds", 300, minimum=1),
            modalities={
                str(modality).upper(): _modality_rule(str(modality).upper(), rule, questions)
                for modality, rule in modalities.items()
            },
            retry=RetryPolicy(
                max_attempts=int(_number(retry, "MaxAttempts", 20, minimum=1, where="Retry.")),
                first_delay_s=_number(retry, "FirstDelaySeconds", 10, minimum=0.01, where="Retry."),
                max_delay_s=_number(retry, "MaxDelaySeconds", 600, minimum=0.01, where="Retry."),
            ),
            queue_file=str(section.get("QueueFile") or default_queue_file(configuration)),
            senders=int(_number(section, "Senders", 2, minimum=1, maximum=16)),
            stable_age_s=float(configuration.get("StableAge", 60)),
        )


def _number(
    section: Mapping[str, Any],
    key: str,
    default: float,
    *,
    minimum: float,
    maximum: float = math.inf,
    where: str = "",
) -> float:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value <= maximum:
        raise ConfigurationError(f'"MedMO.{where}{key}" must be a number from {minimum:g} to {maximum:g}')
    return float(value)


def _modality_rule(modality: str, rule: Any, questions: Mapping[str, str]) -> ModalityRule:
    where = f'"MedMO.Modalities.{modality}"'
    if modality in NOT_IMAGES:
        raise ConfigurationError(f"{where}: {modality} objects are not images and are never routed")
    if not isinstance(rule, Mapping) or not isinstance(rule.get("Tasks"), list):
        raise ConfigurationError(f'{where} must be {{"Tasks": [...]}} (an empty list skips the modality)')
    tasks = tuple(parse_task(name, questions, where) for name in rule["Tasks"])
    if len({task.name for task in tasks}) != len(tasks):
        raise ConfigurationError(f"{where}: a task is listed twice")
    instances = rule.get("Instances", 1 if modality in CROSS_SECTIONAL else "all")
    if instances == "all":
        return ModalityRule(tasks, None)
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ConfigurationError(
            f'"MedMO.Modalities.{modality}.Instances" must be a number of slices (1: the middle one) or "all"'
        )
    return ModalityRule(tasks, instances)


def parse_task(name: Any, questions: Mapping[str, str], where: str = "a task") -> Task:
    """ "report", "ground", "ground:gsps" or "vqa:<name of a question in MedMO.Questions>"."""
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
        raise ConfigurationError(f"{where}: {name!r} is not a task")
    route, _, variant = name.partition(":")
    if route in ("report", "ground") and not variant:
        return Task(name, route, "application/dicom")
    if route == "ground" and variant == "gsps":
        return Task(name, route, "application/dicom; object=gsps")
    if route == "vqa" and variant:
        if variant not in questions:
            raise ConfigurationError(f'{where}: {name!r} names no question in "MedMO.Questions"')
        return Task(name, route, "application/dicom", question=questions[variant].strip())
    raise ConfigurationError(
        f'{where}: {name!r} is not a task: use "report", "ground", "ground:gsps" or "vqa:<question name>"'
    )


def default_queue_file(configuration: Mapping[str, Any]) -> str:
    """Beside Orthanc's index, on the volume that survives its restarts."""
    folder = configuration.get("IndexDirectory") or configuration.get("StorageDirectory") or "OrthancStorage"
    return os.path.join(str(folder), "medmo-queue.sqlite")


# --- which instances of a series ---------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    instance_id: str  # Orthanc's
    sop_instance_uid: str
    instance_number: int | None
    position: tuple[float, ...] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient

    @classmethod
    def from_orthanc(cls, instance: Mapping[str, Any]) -> Slice:
        """From an entry of Orthanc's /series/{id}/instances (its main DICOM tags)."""
        tags = instance.get("MainDicomTags", {})
        number = str(tags.get("InstanceNumber", "")).strip()
        return cls(
            instance_id=str(instance["ID"]),
            sop_instance_uid=str(tags.get("SOPInstanceUID", "")),
            instance_number=int(number) if re.fullmatch(r"[+-]?\d+", number) else None,
            position=_decimals(tags.get("ImagePositionPatient"), 3),
            orientation=_decimals(tags.get("ImageOrientationPatient"), 6),
        )


def _decimals(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(part) for part in str(value).split("\\"))
    except ValueError:
        return None
    return numbers if len(numbers) == count and all(map(math.isfinite, numbers)) else None


def ordered(slices: Sequence[Slice]) -> list[Slice]:
    """Slices in their order through the volume: by position along the slice normal when every slice has a
    position and orientation, else by Instance Number (which scanners may count either way, or restart).

    A series mixing orientations (a localizer among axial slices) is ordered by its most common
    orientation, and the others are left out: their positions say nothing along that normal.
    """
    if slices and all(s.position is not None and s.orientation is not None for s in slices):
        rounded = Counter(tuple(round(v, 3) for v in s.orientation or ()) for s in slices)
        reference = rounded.most_common(1)[0][0]
        stack = [s for s in slices if tuple(round(v, 3) for v in s.orientation or ()) == reference]
        normal = _cross(reference[:3], reference[3:])
        return sorted(stack, key=lambda s: (_dot(s.position or (), normal), s.sop_instance_uid))
    return sorted(
        slices,
        key=lambda s: (s.instance_number is None, s.instance_number or 0, s.sop_instance_uid),
    )


def evenly_spaced(total: int, count: int) -> list[int]:
    """Indices of `count` items spread over `total`, each the middle of its share: 1 of 40 is 20."""
    if count >= total:
        return list(range(total))
    return [(2 * i + 1) * total // (2 * count) for i in range(count)]


def choose(slices: Sequence[Slice], instances: int | None) -> list[Slice]:
    """What to send of a series: every instance, or `instances` slices evenly spaced through the volume."""
    if instances is None:
        return sorted(slices, key=lambda s: (s.instance_number or 0, s.sop_instance_uid))
    stack = ordered(slices)
    return [stack[index] for index in evenly_spaced(len(stack), instances)]


def _cross(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- calling the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What the service said to one request: a status, or None when it could not be reached."""

    status: int | None
    body: bytes = b""
    retry_after_s: float | None = None
    problem: str = ""  # for the log: the error code or the transport failure, never content

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: a number of seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The service never redirects: a redirect is an answer (refused), not somewhere to send the image and
    the key."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# The service is on the hospital network; proxy variables in Orthanc's environment are for the internet.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())


def request_id(instance_id: str, task: Task) -> str:
    """The X-Request-ID of a work item, the same at every attempt: the service's access log shows an item
    sent twice as one id twice, yet holds nothing that leads back to the patient (a digest of Orthanc's
    own identifier, not a DICOM UID)."""
    return f"orthanc-{hashlib.sha256(instance_id.encode()).hexdigest()[:20]}-{task.name}"


def ask(settings: RouterSettings, task: Task, dicom: bytes, request_id: str) -> Answer:
    """POST one DICOM instance to the task's route, asking for the DICOM object it answers."""
    headers = {
        "Content-Type": "application/dicom",
        "Accept": task.accept,
        "X-Request-ID": request_id,
        # The service gives up when this side stops waiting, instead of computing an answer for nobody.
        "X-Request-Timeout": str(int(settings.timeout_s)),
    }
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    request = urllib.request.Request(task.url(settings.url), data=dicom, headers=headers, method="POST")
    deadline = time.monotonic() + settings.timeout_s
    try:
        # The timeout bounds each wait on the socket; the deadline bounds the whole answer, so that a
        # service trickling bytes cannot hold a sender longer than TimeoutSeconds either.
        with _OPENER.open(request, timeout=settings.timeout_s) as response:
            body = bytearray()
            while chunk := response.read1(64 * 1024):
                body += chunk
                if len(body) > MAX_ANSWER_BYTES:
                    return Answer(int(response.status), problem=f"an answer over {MAX_ANSWER_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError
            return Answer(int(response.status), bytes(body))
    except urllib.error.HTTPError as error:
        try:
            return Answer(
                error.code,
                retry_after_s=parse_retry_after(error.headers.get("Retry-After"), time.time()),
                problem=_error_code(error.read(64 * 1024)),
            )
        finally:
            error.close()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        # Refused, reset, timed out, cut short: the service did not answer.
        reason = getattr(error, "reason", error)
        return Answer(None, problem=type(reason).__name__)


def _error_code(body: bytes) -> str:
    """The `code` of the service's error shape: a fixed word such as unusable_image, safe to log."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return ""
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""


def is_dicom_file(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then "DICM"."""
    return len(data) > 132 and data[128:132] == b"DICM"
