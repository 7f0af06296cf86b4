"""Which representation a client asked for with its Accept header: JSON, or a DICOM Structured Report."""

from __future__ import annotations

from app.api.errors import ApiError

DICOM = "application/dicom"
JSON = "application/json"


def wants_dicom(accept: str | None) -> bool:
    """True when application/dicom is preferred to JSON; 406 when the client accepts neither.

    Wildcards (*/*, application/*) count for JSON, the default, a hair below an explicit type, so that
    "application/dicom, */*" asks for DICOM and a browser's or curl's "*/*" gets JSON.
    """
    if not accept or not accept.strip():
        return False
    json_quality = dicom_quality = 0.0
    for entry in accept.split(","):
        media, *parameters = (part.strip() for part in entry.split(";"))
        quality = _quality(parameters)
        media = media.lower()
        if media == JSON:
            json_quality = max(json_quality, quality)
        elif media in ("*/*", "application/*"):
            json_quality = max(json_quality, quality - 0.0001)
        elif media == DICOM:
            dicom_quality = max(dicom_quality, quality)
    if dicom_quality > 0 and dicom_quality > json_quality:
        return True
    if json_quality > 0:
        return False
    raise ApiError(406, "not_acceptable", f"responses are {JSON}, or {DICOM} (a Structured Report)")


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0
