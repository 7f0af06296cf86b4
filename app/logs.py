"""Structured logging: one JSON object per line, for every logger in the process.

Only what code puts in a record's message or its `fields` extra is written. The service logs identifiers,
sizes, timings and error types; never request content (questions, images, generated text), patient data
or keys.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        return json.dumps(entry, default=str)


def _log_warning_without_text(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: object, **__: object
) -> None:
    # A warning's text can quote what it is about (a DICOM value, a field of a request): only where it
    # came from is logged.
    logging.getLogger("medmo.warnings").warning(
        "library warning", extra={"fields": {"category": category.__name__, "at": f"{filename}:{lineno}"}}
    )


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # uvicorn's access log writes the raw request line, query string included; ours replaces it.
    logging.getLogger("uvicorn.access").disabled = True
    # Libraries that chat at INFO about downloads and weights; the HTTP clients also write every URL they
    # request, and the PACS's URLs (DICOMweb) hold Study, Series and SOP Instance UIDs.
    for noisy in (
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "huggingface_hub",
        "transformers",
        "filelock",
        "urllib3",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pydicom logs what it reads at DEBUG, and its warnings quote element values: patient data. highdicom
    # logs the source's UIDs at INFO while building a report, and a doubtful patient name at WARNING.
    for reader in ("pydicom", "highdicom"):
        logging.getLogger(reader).setLevel(logging.ERROR)
    warnings.showwarning = _log_warning_without_text
