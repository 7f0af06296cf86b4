"""A DICOMweb client for the one PACS the service is configured with: search it (QIDO-RS), fetch instances
(WADO-RS), store DICOM objects into a study (STOW-RS).

Only URLs built here are requested: the configured base (MEDMO_DICOMWEB_URL) followed by UIDs that the
routes validated as DICOM UIDs (or that the PACS's own search answers gave, checked the same way), and
search keys sent as query parameters; nothing a client sends is ever fetched. Each call is bounded: in time
(MEDMO_DICOMWEB_TIMEOUT_S, from connecting to the last byte), in retries (MEDMO_DICOMWEB_RETRIES, only when
the PACS could not be reached or answered 502, 503 or 504), and in bytes (counted as they arrive, so a PACS
sending too much is cut off, not buffered). Failures are exceptions that the API maps to statuses: no such
instance (404), PACS unreachable or misbehaving (502), PACS too slow (504), not configured (503). Logs say
which call failed and how, never a URL: URLs hold UIDs, and a search for priors the Patient ID.

httpx2 (the maintained continuation of httpx, already a dependency of the Hugging Face hub client) makes
the calls asynchronously, so a request's deadline and its client hanging up cancel them; python-multipart
(already parsing the service's uploads) reads the multipart/related answer of WADO-RS as it streams.
dicomweb-client was considered: it is synchronous (requests), reads whole responses without a bound, and
would add requests to the service's dependencies for two calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx2
from pydicom import Dataset
from python_multipart.multipart import MultipartParser

from app.imaging import ImageTooLargeError

logger = logging.getLogger("medmo.dicomweb")

# A DICOM UID (PS3.5 9.1): numeric components without leading zeros, dot-separated, at most 64 characters.
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
UID_MAX_LENGTH = 64
# The instance in whatever transfer syntax the PACS holds it: the service decodes the compressed ones
# itself, and asking for another would make the PACS transcode (or refuse, without the codec).
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
# A STOW-RS answer lists what was stored; far less than this.
MAX_STORE_ANSWER_BYTES = 1024 * 1024
# A QIDO-RS answer lists a series' instances with the fields below: about 2 KB each, so a series of a few
# thousand slices fits; a PACS sending more is cut off rather than buffered.
MAX_SEARCH_ANSWER_BYTES = 16 * 1024 * 1024
# What a search asks the PACS to return besides its defaults (PS3.18 10.6.1.2.3), each in a parameter of
# its own: Orthanc does not read a comma-separated list.
INSTANCE_FIELDS = (
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "Modality",
    "ViewPosition",
    "SeriesDescription",
    "SeriesNumber",
)
STUDY_FIELDS = (
    "StudyInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "StudyDate",
    "StudyTime",
    "ModalitiesInStudy",
)
SERIES_FIELDS = (
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
# Statuses that say "not now" (a gateway, or the PACS itself, restarting); others are final.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
FIRST_RETRY_DELAY_S = 0.25
MAX_URL_CHARS = 2048

T = TypeVar("T")


class PacsError(Exception):
    """The PACS (or another hospital server) failed to do what was asked; the message is for the client and
    holds no UID. `status` is the server's HTTP status when it answered one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PacsNotFoundError(PacsError):
    """The PACS has no instance (or series) with these UIDs."""


class PacsTimeoutError(PacsError):
    """The PACS did not answer in time."""


class PacsNotConfiguredError(PacsError):
    """No PACS is configured (MEDMO_DICOMWEB_URL), or its credentials cannot be read."""


class _TryAgainError(Exception):
    """A failure that another try may not have: the PACS unreachable, or answering 502, 503, 504."""

    def __init__(self, final: PacsError) -> None:
        super().__init__(str(final))
        self.final = final


@dataclass(frozen=True)
class ServerSettings:
    """A hospital server the service calls: the PACS (DICOMweb), the EHR's FHIR server."""

    url: str  # the base, without a trailing slash
    credentials_file: Path | None
    timeout_s: float  # per call, connecting to the last byte
    retries: int


@dataclass(frozen=True)
class PacsSettings(ServerSettings):
    max_instance_bytes: int


@dataclass(frozen=True)
class InstanceUids:
    """An instance in the PACS, by the three UIDs its WADO-RS path is made of."""

    study: str
    series: str
    instance: str


@dataclass(frozen=True)
class StoredReference:
    """What the PACS says it stored: the object, and where it can be retrieved (its own URL, as it wrote
    it: returned to the client, never requested here)."""

    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str | None


def read_credentials(path: Path) -> str:
    """The Authorization header for the PACS from its credentials file: the first line that is not empty
    or a # comment, either `user:password` (HTTP Basic) or `Bearer <token>`. Raises ValueError naming the
    problem, never the content."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the PACS credentials file ({type(exc).__name__})") from None
    entry = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), "")
    if entry[:7].lower() == "bearer " and entry[7:].strip():
        token = entry[7:].strip()
        if not (token.isascii() and token.isprintable()):  # an HTTP header carries neither
            raise ValueError("the token in the PACS credentials file must be printable ASCII")
        return f"Bearer {token}"
    user, colon, password = entry.partition(":")
    if not colon or not user:
        raise ValueError("the PACS credentials file must hold 'user:password' or 'Bearer <token>'")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class HospitalServer:
    """What every call to a configured hospital server shares: its login read from a file at each request,
    no redirects, no proxies from the environment, no compression, and one call bounded in time and tried
    again only when the server could not be reached or said it is unavailable. Failures are `PacsError`s
    whose message names `server`."""

    server = "the server"  # as messages name it
    log_name = "HTTP"  # as the log names its calls

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings

    def _client(self) -> httpx2.AsyncClient:
        headers = {}
        if self.settings.credentials_file is not None:
            try:
                # Read at every request: a rotated password is used at once, without a restart.
                headers["Authorization"] = read_credentials(self.settings.credentials_file)
            except ValueError as exc:
                logger.warning("%s credentials: %s", self.log_name, exc)
                raise PacsNotConfiguredError(
                    f"the credentials of {self.server} cannot be read: see the server's log"
                ) from None
        # Uncompressed, so that the byte limit counts what is held in memory: a gzip stream could inflate a
        # thousandfold between two counts.
        headers["Accept-Encoding"] = "identity"
        return httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(self.settings.timeout_s),
            # Only the configured server is called: a redirect could send the login, and the request, elsewhere.
            follow_redirects=False,
            # Proxy variables in the environment are for the internet; the server is on the hospital network.
            trust_env=False,
        )

    async def _with_retries(self, call: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """One call, tried again (after 0.25 s, 0.5 s, ...) only when the server could not be reached or
        said it is unavailable; a server that is slow to answer is not asked again (504)."""
        tries = self.settings.retries + 1
        for number in range(1, tries + 1):
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    return await attempt()
            except (TimeoutError, httpx2.ReadTimeout, httpx2.WriteTimeout, httpx2.PoolTimeout) as exc:
                logger.warning(
                    "%s %s: %s after %g s", self.log_name, call, type(exc).__name__, self.settings.timeout_s
                )
                raise PacsTimeoutError(
                    f"{self.server} did not answer within {self.settings.timeout_s:g} s"
                ) from None
            except (httpx2.TransportError, _TryAgainError) as exc:  # ConnectTimeout included
                if isinstance(exc, _TryAgainError):
                    failure = exc.final
                elif isinstance(exc, httpx2.RemoteProtocolError):  # it answered, but not in HTTP
                    failure = PacsError(f"{self.server} answered with a malformed HTTP response")
                else:
                    failure = PacsError(f"{self.server} could not be reached")
                logger.warning("%s %s: %s (try %d of %d)", self.log_name, call, failure, number, tries)
                if number == tries:
                    raise failure from None
            await asyncio.sleep(FIRST_RETRY_DELAY_S * 2 ** (number - 1))
        raise AssertionError("unreachable: the last try returns or raises")


class Dicomweb(HospitalServer):
    """Calls to the configured PACS; one client per request, closed with it."""

    server = "the PACS"
    log_name = "DICOMweb"
    settings: PacsSettings

    def __init__(self, settings: PacsSettings) -> None:
        super().__init__(settings)

    async def retrieve_instance(self, study: str, series: str, instance: str) -> bytes:
        """The instance's DICOM file (WADO-RS), at most `max_instance_bytes` long."""
        url = self._instance_url(InstanceUids(study, series, instance))
        too_large = (
            f"the instance in the PACS is larger than the limit of {self.settings.max_instance_bytes} bytes"
        )
        async with self._client() as client:
            return await self._with_retries(
                "retrieve",
                lambda: self._retrieve(client, url, self.settings.max_instance_bytes, too_large),
            )

    async def retrieve_instances(
        self, instances: Sequence[InstanceUids], max_total_bytes: int
    ) -> list[bytes]:
        """The instances' DICOM files (WADO-RS, one after the other on one connection), at most
        `max_total_bytes` long together: a request's images are bounded together, as uploads are."""
        too_large = (
            f"the {len(instances)} instances asked for in the PACS are together larger than the limit of "
            f"{max_total_bytes} bytes"
        )
        files: list[bytes] = []
        async with self._client() as client:
            for uids in instances:
                room = max_total_bytes - sum(map(len, files))
                attempt = partial(self._retrieve, client, self._instance_url(uids), room, too_large)
                files.append(await self._with_retries("retrieve", attempt))
        return files

    def _instance_url(self, uids: InstanceUids) -> str:
        _check_uids(uids.study, uids.series, uids.instance)
        return f"{self.settings.url}/studies/{uids.study}/series/{uids.series}/instances/{uids.instance}"

    async def search_instances(self, study: str, series: str) -> list[Dataset]:
        """The series' instances (QIDO-RS), with what choosing among them reads (`INSTANCE_FIELDS`); empty
        when the PACS has no such series."""
        _check_uids(study, series)
        return await self.search(f"/studies/{study}/series/{series}/instances", {}, INSTANCE_FIELDS)

    async def search_studies(self, matching: Mapping[str, str]) -> list[Dataset]:
        """The studies whose attributes match (QIDO-RS, e.g. {"PatientID": ..., "StudyDate": "-20250311"}),
        with their patient's identity and date (`STUDY_FIELDS`)."""
        return await self.search("/studies", matching, STUDY_FIELDS)

    async def search_series(self, study: str, matching: Mapping[str, str]) -> list[Dataset]:
        """The study's series whose attributes match (QIDO-RS), with `SERIES_FIELDS`."""
        _check_uids(study)
        return await self.search(f"/studies/{study}/series", matching, SERIES_FIELDS)

    async def search(self, path: str, matching: Mapping[str, str], fields: Sequence[str]) -> list[Dataset]:
        """One QIDO-RS search below the base URL: the matches, each read as a dataset. `path` is made of
        UIDs checked to be DICOM UIDs; the matching keys and values travel as query parameters."""
        query = (*matching.items(), *(("includefield", field) for field in fields))
        url = f"{self.settings.url}{path}"
        async with self._client() as client:
            return await self._with_retries("search", lambda: self._search(client, url, query))

    async def store(self, study: str, documents: Sequence[bytes]) -> list[StoredReference]:
        """Store DICOM files into a study (STOW-RS); what the PACS says it stored."""
        boundary = uuid.uuid4().hex
        body = (
            b"".join(
                b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), document)
                for document in documents
            )
            + b"--%s--\r\n" % boundary.encode()
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON,
        }
        url = f"{self.settings.url}/studies/{study}"
        async with self._client() as client:
            return await self._with_retries(
                "store", lambda: self._store(client, url, body, headers, len(documents))
            )

    async def _retrieve(self, client: httpx2.AsyncClient, url: str, max_bytes: int, too_large: str) -> bytes:
        async with client.stream("GET", url, headers={"Accept": WADO_ACCEPT}) as response:
            if response.status_code == 404:
                raise PacsNotFoundError("the PACS has no instance with these UIDs")
            check_status(response, "retrieving the instance")
            check_uncompressed(response)
            media_type, parameters = _media_type(response.headers.get("content-type", ""))
            if media_type != "multipart/related":
                raise PacsError(
                    f"the PACS answered {media_type[:64] or 'no media type'}, not multipart/related"
                )
            if not parameters.get("boundary"):
                raise PacsError("the PACS answered multipart/related without a boundary")
            reader = _FirstPart(parameters["boundary"], max_bytes, too_large)
            async for chunk in response.aiter_raw():
                reader.feed(chunk)
            return reader.finish()

    async def _search(
        self, client: httpx2.AsyncClient, url: str, query: tuple[tuple[str, str], ...]
    ) -> list[Dataset]:
        async with client.stream("GET", url, params=query, headers={"Accept": DICOM_JSON}) as response:
            # No content, or no such study or series (some PACSs say 404 where Orthanc lists nothing).
            if response.status_code in (204, 404):
                return []
            check_status(response, "searching")
            check_uncompressed(response)
            answer = await read_within(response, MAX_SEARCH_ANSWER_BYTES, "a search")
        # Thousands of instances take a moment to read: off the event loop, which serves other requests.
        return await asyncio.to_thread(_matches, answer)

    async def _store(
        self, client: httpx2.AsyncClient, url: str, body: bytes, headers: dict[str, str], count: int
    ) -> list[StoredReference]:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            check_uncompressed(response)
            answer = await read_within(response, MAX_STORE_ANSWER_BYTES, "the store")
            # 409: nothing stored; the body says why, read below.
            if response.status_code != 409:
                check_status(response, "storing the answer")
        return _stored(answer, count, response.status_code)


async def read_within(
    response: httpx2.Response, max_bytes: int, what: str, server: str = "the PACS"
) -> bytes:
    """A whole answer, counted as it arrives: one longer than `max_bytes` is the server's failure."""
    answer = bytearray()
    async for chunk in response.aiter_raw():
        answer += chunk
        if len(answer) > max_bytes:
            raise PacsError(f"{server} answered {what} with more than {max_bytes // (1024 * 1024)} MiB")
    return bytes(answer)


def _matches(answer: bytes) -> list[Dataset]:
    """A QIDO-RS answer (a JSON array of DICOM JSON datasets). Whatever the PACS wrote there, an answer
    this cannot read is the PACS's failure (502), never the service's."""
    try:
        matches = json.loads(answer)
        if not isinstance(matches, list) or not all(isinstance(match, dict) for match in matches):
            raise TypeError("not an array of objects")
        return [Dataset.from_json(match) for match in matches]
    except Exception as exc:  # json, and pydicom raising what the JSON's shape leads it to
        raise PacsError(
            f"the PACS answered a search with something else than DICOM JSON ({type(exc).__name__})"
        ) from None


def _check_uids(*uids: str) -> None:
    """UIDs about to be part of a URL: the routes checked theirs; these may come from the PACS's answers."""
    if not all(map(is_uid, uids)):
        raise PacsError("the PACS named an object by something else than a DICOM UID")


def check_status(response: httpx2.Response, doing: str, server: str = "the PACS") -> None:
    status = response.status_code
    if status < 300:
        return
    if status in RETRYABLE_STATUSES:
        raise _TryAgainError(PacsError(f"{server} answered {status} {doing}", status))
    if status in (401, 403):
        raise PacsError(f"{server} refused the service's credentials ({status}) {doing}", status)
    raise PacsError(f"{server} answered {status} {doing}", status)


def check_uncompressed(response: httpx2.Response, server: str = "the PACS") -> None:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise PacsError(f"{server} answered with Content-Encoding {encoding[:32]}, though asked for none")


def _media_type(header: str) -> tuple[str, dict[str, str]]:
    media_type, *parameters = (part.strip() for part in header.split(";"))
    pairs = {}
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        pairs[name.strip().lower()] = value.strip().strip('"')
    return media_type.lower(), pairs


class _FirstPart:
    """The first part of a multipart/related stream, parsed as it arrives, within a byte limit."""

    def __init__(self, boundary: str, max_bytes: int, too_large: str) -> None:
        self.max_bytes = max_bytes
        self.too_large = too_large
        self.received = 0
        self.parts = 0
        self.data = bytearray()
        self.ended = False

        def on_part_begin() -> None:
            self.parts += 1

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self.parts == 1:  # an instance retrieve has one part; any other is ignored
                self.data += data[start:end]

        def on_end() -> None:
            self.ended = True

        self.parser = MultipartParser(
            boundary,
            {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_end": on_end},
            max_header_count=32,
        )

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        # Headers and boundaries add a little to the file itself.
        if self.received > self.max_bytes + 64 * 1024:
            raise ImageTooLargeError(self.too_large)
        try:
            self.parser.write(chunk)
        except Exception as exc:  # python-multipart raises its own error types, and ValueError
            raise PacsError(f"the PACS's multipart answer is malformed ({type(exc).__name__})") from None

    def finish(self) -> bytes:
        if not self.ended or self.parts == 0:
            raise PacsError("the PACS's answer holds no DICOM instance")
        if not self.data:
            raise PacsError("the PACS's answer holds an empty instance")
        if len(self.data) > self.max_bytes:
            raise ImageTooLargeError(self.too_large)
        return bytes(self.data)


def _stored(answer: bytes, count: int, status: int) -> list[StoredReference]:
    """The STOW-RS response (a DICOM JSON dataset): what was stored, or why not. Whatever the PACS wrote
    there, a body this cannot read is the PACS's failure (502), never the service's."""
    try:
        return _confirmed(Dataset.from_json(answer.decode("utf-8")), count, status)
    except PacsError:
        raise
    except Exception as exc:  # pydicom raises what the JSON's shape leads it to: Value, Type, Attribute...
        raise PacsError(
            f"the PACS answered the store ({status}) without a readable DICOM JSON body ({type(exc).__name__})"
        ) from None


def _confirmed(dataset: Dataset, count: int, status: int) -> list[StoredReference]:
    failed = list(dataset.get("FailedSOPSequence", []))
    if failed or status == 409:
        reasons = sorted({f"{int(item.get('FailureReason', 0)):04X}H" for item in failed}) or ["unstated"]
        raise PacsError(
            f"the PACS did not store {len(failed) or count} of {count} objects "
            f"(failure reason {', '.join(reasons)})"
        )
    stored = [
        StoredReference(
            sop_class_uid=str(item.get("ReferencedSOPClassUID", "")),
            sop_instance_uid=str(item.get("ReferencedSOPInstanceUID", "")),
            retrieve_url=_web_address(item.get("RetrieveURL")),
        )
        for item in dataset.get("ReferencedSOPSequence", [])
    ]
    if len(stored) != count:
        raise PacsError(f"the PACS confirmed {len(stored)} of the {count} objects stored")
    return stored


def _web_address(value: object) -> str | None:
    """The PACS's retrieve URL as it wrote it, if it is an http(s) address: it is handed to clients, which
    may open it (a javascript: or file: "URL" is not passed on)."""
    address = str(value or "").strip()
    scheme = urlsplit(address).scheme.lower() if address else ""
    return address if scheme in ("http", "https") and len(address) <= MAX_URL_CHARS else None


def is_uid(value: str) -> bool:
    return len(value) <= UID_MAX_LENGTH and re.fullmatch(UID_PATTERN, value) is not None
