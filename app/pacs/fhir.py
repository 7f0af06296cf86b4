"""A FHIR client for the one FHIR server the service is configured with (MEDMO_FHIR_URL): it sends each
DICOMweb answer's bundle there, with the PACS client's rules (`HospitalServer`): the login read from
MEDMO_FHIR_CREDENTIALS_FILE at each call, the PACS's timeout and retries (only when the server could not be
reached or answered 502, 503 or 504), no redirects, no proxies, no compression.

Where the bundle goes: `POST {base}/Bundle`, the bundle stored as one resource. The writer
(`app/outputs/fhir.py`) builds a "collection" on purpose: a transaction would tell the EHR to create a
Patient the service cannot know is new. FHIR's base-URL POST takes only a batch or a transaction, so a
collection is created as what it is, a Bundle resource, which the EHR's integration engine (Mirth,
Rhapsody, the EHR's FHIR inbox, a Subscription on Bundle) reads and files, matching the Patient by its
identifier. The server's answer is read only for its status and Location.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx2

from app.outputs.fhir import FHIR_JSON
from app.pacs.dicomweb import (
    MAX_URL_CHARS,
    HospitalServer,
    check_status,
    check_uncompressed,
    read_within,
)

# An OperationOutcome or the stored bundle echoed back: far less than this.
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Receipt:
    """What the FHIR server said of a bundle it took: its status, and where the stored Bundle is (its own
    URL, returned to the client, never requested here)."""

    status: int
    location: str | None


class FhirServer(HospitalServer):
    """Calls to the configured FHIR server; one client per call, closed with it."""

    server = "the FHIR server"
    log_name = "FHIR"

    async def send_bundle(self, bundle: dict[str, Any]) -> Receipt:
        """Create the bundle on the server (`POST {base}/Bundle`); raises PacsError (or its timeout) naming
        the FHIR server when it did not take it."""
        body = json.dumps(bundle).encode()
        headers = {
            "Content-Type": f"{FHIR_JSON}; fhirVersion=4.0",
            "Accept": FHIR_JSON,
            "Prefer": "return=minimal",
        }
        url = f"{self.settings.url}/Bundle"
        async with self._client() as client:
            return await self._with_retries("send", lambda: self._send(client, url, body, headers))

    async def _send(
        self, client: httpx2.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> Receipt:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            # Read first, within a bound, so that a large answer is cut off rather than buffered.
            check_uncompressed(response, self.server)
            await read_within(response, MAX_ANSWER_BYTES, "the bundle", self.server)
            check_status(response, "sending the bundle", self.server)
        return Receipt(response.status_code, self._location(response.headers.get("location")))

    def _location(self, value: str | None) -> str | None:
        """The stored Bundle's address as the server wrote it, made absolute against the base; only an
        http(s) address is passed on."""
        if not value or not value.strip():
            return None
        address = urljoin(f"{self.settings.url}/", value.strip())
        scheme = urlsplit(address).scheme.lower()
        return address if scheme in ("http", "https") and len(address) <= MAX_URL_CHARS else None
