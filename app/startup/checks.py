"""`medmo-serve --check`: what a start would need, checked in seconds and offline, one line each.

Settings, device, dtype, attention and weights: each line says what was found, or why it will not do and
what to set. Nothing is downloaded and the model is not loaded; the weights are checked in the cache (or
the folder) the way an offline start reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.api.keys import ApiKeys
from app.engine.runtime import ModelLoadError, Placement
from app.settings import Settings
from app.startup import weights
from app.startup.progress import StartupProgress


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not checked, because what it depends on failed
    detail: str

    def line(self) -> str:
        verdict = {True: "ok", False: "FAILED", None: "not checked"}[self.ok]
        return f"{self.name}: {verdict}: {self.detail}"


def describe_settings(settings: Settings) -> Check:
    """Settings that parsed can still name a key file that cannot be read; the rest is summarised."""
    try:
        keys = ApiKeys.from_settings(settings)
    except ValueError as exc:
        return Check("settings", False, str(exc))
    listening = f"{settings.host}:{settings.port}"
    if settings.probe_port is not None:
        listening += f", probes on {settings.probe_port}"
    access = "API keys required" if keys.enabled else "no API keys: open to anyone who can reach the port"
    return Check("settings", True, f"{settings.model}, {settings.engine} engine, {listening}, {access}")


def run_checks(settings: Settings) -> list[Check]:
    checks = [describe_settings(settings)]
    placement = Placement.from_settings(settings)

    def attempt(name: str, probe: Callable[[], str]) -> bool:
        try:
            checks.append(Check(name, True, probe()))
            return True
        except ModelLoadError as exc:
            checks.append(Check(name, False, str(exc)))
            return False

    if attempt("device", lambda: placement.check_device(settings.device)):
        attempt("dtype", placement.check_dtype)
        attempt("attention", placement.check_attention)
    else:
        for name in ("dtype", "attention"):
            checks.append(Check(name, None, "the device is not usable"))
    checks.append(check_weights(settings))
    return checks


def check_weights(settings: Settings) -> Check:
    """The weights as an offline start would find them: in the folder, or complete in the cache."""
    try:
        if weights.is_local(settings.model):
            checkpoint = weights.resolve(settings, StartupProgress(interactive=False))
        else:
            checkpoint = weights.cached(settings)
        _read_config(checkpoint.folder)
    except weights.WeightsError as exc:
        return Check("weights", False, str(exc))
    return Check("weights", True, weights.describe(checkpoint))


def _read_config(folder: Path) -> None:
    """transformers reads the config (offline: it is a folder), so an architecture it lacks fails here."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise weights.WeightsError(f"transformers cannot read the config in {folder}: {reason}") from exc
