"""The API keys this service accepts, and how a presented key is checked.

Keys come from MEDMO_API_KEYS and/or MEDMO_API_KEY_FILE. The file is re-read when it changes, so keys
rotate without a restart: add the new key, move clients over, remove the old one. Presented keys are
compared in constant time against every configured key (SHA-256 digests through hmac.compare_digest,
with no early exit), so neither a key's content nor its length can be learned from response times.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
from pathlib import Path

from app.settings import Settings, check_keys

logger = logging.getLogger("medmo.auth")

_RECHECK_FILE_S = 1.0


class ApiKeys:
    def __init__(self, inline: list[str], file: Path | None) -> None:
        self._inline = [_digest(key) for key in check_keys(inline)]
        self._file = file
        self._file_keys: list[bytes] = []
        self._file_stamp: tuple[float, int] | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if file is not None:
            self._reload(force=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        inline = settings.api_keys.get_secret_value().split(",") if settings.api_keys else []
        return cls(inline, settings.api_key_file)

    @property
    def enabled(self) -> bool:
        return bool(self._inline) or self._file is not None

    def verify(self, presented: str) -> bool:
        if self._file is not None:
            self._reload(force=False)
        candidate = _digest(presented)
        matched = False
        for key in [*self._inline, *self._file_keys]:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def _reload(self, *, force: bool) -> None:
        assert self._file is not None
        now = time.monotonic()
        if not force and now - self._checked_at < _RECHECK_FILE_S:
            return
        with self._lock:
            self._checked_at = now
            try:
                status = self._file.stat()
                stamp = (status.st_mtime, status.st_size)
                if stamp == self._file_stamp:
                    return
                lines = self._file.read_text().splitlines()
                keys = check_keys([line for line in lines if not line.lstrip().startswith("#")])
            except (OSError, ValueError) as exc:
                if force:
                    raise ValueError(f"MEDMO_API_KEY_FILE cannot be used: {exc}") from None
                # Keep the keys already loaded: a half-written file must not lock everyone out.
                logger.error(
                    "could not re-read the API key file (%s); keeping the keys loaded before",
                    type(exc).__name__,
                )
                return
            self._file_keys = [_digest(key) for key in keys]
            self._file_stamp = stamp
            logger.info("API key file loaded", extra={"fields": {"keys": len(keys)}})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.strip().encode()).digest()
