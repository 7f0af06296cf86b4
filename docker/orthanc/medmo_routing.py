"""Series-level routing from Orthanc to MedMO Serve: the rules.

Orthanc's Python plugin runs `medmo_router.py`, which hands Orthanc's events and REST API to the senders
(`medmo_senders.py`, their queue in `medmo_queue.py`); this module holds what they decide with: the
"MedMO" settings, the tasks, which instances of a series to send and how each is captioned, which earlier
study is the prior to compare with, and one request to the service (the images as multipart/form-data)
with what its answer means. Standard library only: the plugin runs Debian's or the Orthanc image's
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
import urllib.request
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LOG_PREFIX = "MedMO router: "
# Where the tasks done for a series are recorded (declared in orthanc.json's "UserMetadata"). An earlier
# version recorded them on each instance sent; planning reads those too.
ROUTED = "MedMORouted"

# Cross-sectional series are stacks of slices through one volume: the middle slice stands for the series,
# or a few evenly spaced show its extent. Any other modality (CR, DX, MG, US, XA, ...) is projection
# imaging, each instance a view of its own, and every instance is sent (up to MaxImages).
CROSS_SECTIONAL = frozenset({"CT", "MR", "PT", "NM"})
# Objects that are not images: nothing to look at, and SRs and presentation states are what the service
# writes, so routing them would loop.
NOT_IMAGES = frozenset({"SR", "KO", "PR", "SEG", "DOC", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG"})

# Answers that say "not now": the service is overloaded (429), not ready or draining (503), a proxy in
# front of it failed (502, 504), the request timed out on the way (408), or the model failed this
# request (500, worth another try on a fresh batch). And answers that say the router is misconfigured
# (401, 403: the key; 404: the URL): every request would get them, and dropping the whole queue for a typo
# would lose it; it waits instead, and sends once the configuration is fixed. Any other status is the
# service's final word on those images.
RETRYABLE = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})
# The hint for the log line when every request would get that status: the router's settings, not the service.
MISCONFIGURED = {
    401: " (the service refused MedMO.ApiKey)",
    403: " (the service refused MedMO.ApiKey)",
    404: " (MedMO.Url does not lead to the service)",
}
# A Structured Report or presentation state is kilobytes; anything near this is not one.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# The service's own default for MEDMO_MAX_IMAGES, and the most it allows.
DEFAULT_MAX_IMAGES = 8
MOST_IMAGES = 64
# A service asking for more than a day is misconfigured; waiting longer would look like a hang.
MAX_RETRY_AFTER_S = 86_400.0
_TASK_NAME = re.compile(r"[a-z]+(:[A-Za-z0-9_-]+)?")
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
# A View Position (CS: capitals, digits, space, underscore) is the caption of a projection image.
_VIEW_POSITION = re.compile(r"[A-Z0-9 _]{1,16}")
_DICOM_DATE = re.compile(r"\d{8}")
# What /tools/find would read as a wildcard or a list: such a Patient ID could match another patient's studies.
_FIND_SPECIAL = re.compile(r"[*?\\]")


class ConfigurationError(ValueError):
    """The "MedMO" section cannot be used; the message names the setting."""


# --- settings ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One configured task: the route it calls and what it asks for."""

    name: str  # as configured, recorded in the metadata and logged: report, ground:gsps, vqa:effusion
    route: str  # report, ground, vqa
    accept: str  # the DICOM object wanted back
    question: str | None = None  # vqa: the fixed question, sent as the form's `question` field

    def url(self, base_url: str) -> str:
        # No query string: the service takes a multipart request's fields from the form only.
        return f"{base_url}/{self.route}"

    @property
    def fields(self) -> dict[str, str]:
        """The form's text fields besides the images and their captions."""
        return {"question": self.question} if self.question else {}

    @property
    def compares(self) -> bool:
        """Whether a prior study is sent with the series when the modality asks for one: a report or an
        answer may compare; grounding draws on the current images only (a presentation state references
        one study)."""
        return self.route in ("report", "vqa")


@dataclass(frozen=True)
class ModalityRule:
    tasks: tuple[Task, ...]
    # Instances sent per series: None for every instance (up to MaxImages), else that many, evenly spaced
    # through the series.
    instances: int | None
    # Whether report and vqa requests hold the latest earlier study of the same modality too.
    prior: bool = False
    # The service's priority for the modality's series (stat, urgent, routine); None: the study's own.
    priority: str | None = None


PRIORITIES = ("stat", "urgent", "routine")
# DICOM's words for how soon a procedure is wanted (Requested Procedure Priority, 0040,1003; the retired
# Study Priority ID, 0032,000C, says HIGH, MED or LOW), as the service's priorities.
_DICOM_PRIORITIES = {
    "STAT": "stat",
    "HIGH": "urgent",
    "MEDIUM": "routine",
    "MED": "routine",
    "ROUTINE": "routine",
    "LOW": "routine",
}


def study_priority(tags: Mapping[str, Any]) -> str:
    """The priority an instance's study was ordered with, from Orthanc's simplified tags of the instance:
    Requested Procedure Priority, at the top level or in a Request Attributes item (the highest there),
    else Study Priority ID; routine when none says."""
    said = [tags.get("RequestedProcedurePriority")]
    for item in tags.get("RequestAttributesSequence") or []:
        if isinstance(item, Mapping):
            said.append(item.get("RequestedProcedurePriority"))
    said.append(tags.get("StudyPriorityID"))
    found = [_DICOM_PRIORITIES.get(str(value).strip().upper()) for value in said if isinstance(value, str)]
    known = [priority for priority in found if priority is not None]
    return min(known, key=PRIORITIES.index) if known else "routine"


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
    max_images: int = DEFAULT_MAX_IMAGES  # per request, as the service's MEDMO_MAX_IMAGES allows

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
        max_images = int(_number(section, "MaxImages", DEFAULT_MAX_IMAGES, minimum=1, maximum=MOST_IMAGES))
        return cls(
            url=url.rstrip("/"),
            api_key=api_key,
            timeout_s=_number(section, "TimeoutSeconds", 300, minimum=1),
            modalities={
                str(modality).upper(): _modality_rule(str(modality).upper(), rule, questions, max_images)
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
            max_images=max_images,
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


def _modality_rule(modality: str, rule: Any, questions: Mapping[str, str], max_images: int) -> ModalityRule:
    where = f'"MedMO.Modalities.{modality}"'
    if modality in NOT_IMAGES:
        raise ConfigurationError(f"{where}: {modality} objects are not images and are never routed")
    if not isinstance(rule, Mapping) or not isinstance(rule.get("Tasks"), list):
        raise ConfigurationError(f'{where} must be {{"Tasks": [...]}} (an empty list skips the modality)')
    tasks = tuple(parse_task(name, questions, where) for name in rule["Tasks"])
    if len({task.name for task in tasks}) != len(tasks):
        raise ConfigurationError(f"{where}: a task is listed twice")
    prior = rule.get("Prior", False)
    if not isinstance(prior, bool):
        raise ConfigurationError(f'"MedMO.Modalities.{modality}.Prior" must be true or false')
    if prior and max_images < 2:
        raise ConfigurationError(
            f'"MedMO.Modalities.{modality}.Prior" needs "MedMO.MaxImages" of 2 or more: the prior\'s '
            "images go in the same request"
        )
    priority = rule.get("Priority")
    if priority is not None and priority not in PRIORITIES:
        raise ConfigurationError(
            f'"MedMO.Modalities.{modality}.Priority" must be one of {", ".join(PRIORITIES)} (or absent: the '
            "study's own priority)"
        )
    instances = rule.get("Instances", 1 if modality in CROSS_SECTIONAL else "all")
    if instances == "all":
        return ModalityRule(tasks, None, prior, priority)
    if isinstance(instances, bool) or not isinstance(instances, int) or not 1 <= instances <= max_images:
        raise ConfigurationError(
            f'"MedMO.Modalities.{modality}.Instances" must be a number of slices from 1 (the middle one) to '
            f'"MedMO.MaxImages" ({max_images}), or "all"'
        )
    return ModalityRule(tasks, instances, prior, priority)


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


@dataclass(frozen=True)
class Chosen:
    """An instance chosen to send, and its place in the series' order."""

    instance: Slice
    place: int  # from 1
    of: int  # the instances in that order

    @property
    def slice_label(self) -> str:
        return f"slice {self.place} of {self.of}"


def choose(slices: Sequence[Slice], count: int) -> list[Chosen]:
    """What to send of a series: `count` instances evenly spaced through it (every one, when it holds no
    more), in its order (`ordered`): a stack from one end to the other, views by Instance Number."""
    stack = ordered(slices)
    return [Chosen(stack[index], index + 1, len(stack)) for index in evenly_spaced(len(stack), count)]


def image_counts(wanted: int, max_images: int, with_prior: bool) -> tuple[int, int]:
    """How many images of the series, and at most how many of its prior, one request holds: the series
    keeps what its rule asks for, leaving the prior at least one place; the prior gets the room left, up to
    the same count."""
    if not with_prior:
        return min(wanted, max_images), 0
    current = min(wanted, max_images - 1)
    return current, min(wanted, max_images - current)


def view_label(value: bytes) -> str:
    """A projection image's caption: its View Position (PA, LL, CC, MLO...) when it states a valid one (the
    value of Orthanc's /instances/{id}/content/0018-5101)."""
    text = value.decode("ascii", "replace").strip(" \0")
    return text if _VIEW_POSITION.fullmatch(text) else ""


def caption(label: str, study: str = "", study_date: str = "") -> str:
    """What the model reads before an image: its place or view, after "current, 2025-03-12" or "prior,
    2024-03-12" when the request compares studies. No patient data: a place, a view, a date."""
    when = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}" if _DICOM_DATE.fullmatch(study_date) else ""
    return ", ".join(part for part in (study, when if study else "", label) if part)


# --- the prior --------------------------------------------------------------------------------------------


def tag(resource: Mapping[str, Any], name: str, group: str = "MainDicomTags") -> str:
    """A main DICOM tag of an Orthanc resource (/series/{id}, /studies/{id}, ...), stripped; "" when absent."""
    return str(resource.get(group, {}).get(name, "")).strip()


def prior_query(patient_id: str, study_date: str, modality: str) -> dict[str, Any] | None:
    """The /tools/find request for the patient's studies of `modality` up to `study_date`, or None when they
    cannot be told apart from another patient's (no Patient ID, or one /tools/find would read as a
    wildcard) or from the study itself (no Study Date)."""
    if not patient_id or _FIND_SPECIAL.search(patient_id) or not _DICOM_DATE.fullmatch(study_date):
        return None
    return {
        "Level": "Study",
        "Expand": True,
        "CaseSensitive": True,
        "Query": {"PatientID": patient_id, "StudyDate": f"-{study_date}", "ModalitiesInStudy": modality},
    }


def earlier_studies(
    found: Sequence[Mapping[str, Any]], patient_id: str, study_date: str
) -> list[Mapping[str, Any]]:
    """The studies of /tools/find's answer (expanded) that are the patient's and dated before `study_date`,
    latest first. Orthanc's matching is not trusted alone: the Patient ID must be the same, exactly."""
    earlier = [
        study
        for study in found
        if tag(study, "PatientID", "PatientMainDicomTags") == patient_id
        and _DICOM_DATE.fullmatch(tag(study, "StudyDate"))
        and tag(study, "StudyDate") < study_date
    ]
    return sorted(earlier, key=lambda s: (tag(s, "StudyDate"), tag(s, "StudyTime")), reverse=True)


def comparable_series(
    candidates: Sequence[Mapping[str, Any]], modality: str, current: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """Of a prior study's series (Orthanc's expanded /studies/{id}/series), the one to compare with the
    `current` series (Orthanc's /series/{id}): of the same modality, the one with the same Series
    Description (the same protocol), else the same Series Number, else the most instances (the main
    acquisition, not a scout). The DICOMweb route's rule too (app/pacs/series_choice.py)."""
    description = tag(current, "SeriesDescription").casefold()
    number = tag(current, "SeriesNumber")
    same_modality = [
        series
        for series in candidates
        if tag(series, "Modality").upper() == modality and series.get("Instances")
    ]
    if not same_modality:
        return None
    return max(
        same_modality,
        key=lambda series: (
            bool(description) and tag(series, "SeriesDescription").casefold() == description,
            bool(number) and tag(series, "SeriesNumber") == number,
            len(series["Instances"]),
        ),
    )


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


def request_id(resource_id: str, task: Task) -> str:
    """The X-Request-ID of a work item, the same at every attempt: the service's access log shows an item
    sent twice as one id twice, yet holds nothing that leads back to the patient (a digest of Orthanc's
    own identifier of the series, not a DICOM UID). An item an earlier version queued for one instance
    keeps the id it had."""
    return f"orthanc-{hashlib.sha256(resource_id.encode()).hexdigest()[:20]}-{task.name}"


@dataclass(frozen=True)
class Upload:
    """An image of a request: a DICOM file, and the caption the model reads before it ("" for none)."""

    dicom: bytes
    caption: str = ""


def form_data(images: Sequence[Upload], fields: Mapping[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body as the service reads it, and its Content-Type: one `image` part per image
    in order, one `caption` field per image when any has one, then the task's fields."""
    boundary = f"medmo-{uuid.uuid4().hex}"
    while any(boundary.encode() in image.dicom for image in images):  # astronomically unlikely
        boundary = f"medmo-{uuid.uuid4().hex}"
    parts: list[bytes] = []

    def part(disposition: str, content: bytes, content_type: str | None = None) -> None:
        head = f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        parts.append(head.encode() + b"\r\n" + content + b"\r\n")

    for number, image in enumerate(images, start=1):
        part(f'name="image"; filename="image-{number}.dcm"', image.dicom, "application/dicom")
    if any(image.caption for image in images):
        for image in images:
            part('name="caption"', image.caption.encode())
    for name, value in fields.items():
        part(f'name="{name}"', value.encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def ask(
    settings: RouterSettings, task: Task, images: Sequence[Upload], request_id: str, priority: str = "routine"
) -> Answer:
    """POST a series' chosen images (and its prior's) to the task's route in one request, asking for the
    one DICOM object that answers about them all, with the priority of the series' study."""
    form, content_type = form_data(images, task.fields)
    headers = {
        "Content-Type": content_type,
        "Accept": task.accept,
        "X-Request-ID": request_id,
        # Read before the upload: a full service refuses routine work at once and keeps places for stat.
        "X-Priority": priority,
        # The service gives up when this side stops waiting, instead of computing an answer for nobody.
        "X-Request-Timeout": str(int(settings.timeout_s)),
    }
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    request = urllib.request.Request(task.url(settings.url), data=form, headers=headers, method="POST")
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
