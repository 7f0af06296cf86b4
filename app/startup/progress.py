"""The long phases of a start, made visible: logged, drawn or written as they move, and named by /readyz.

A first start downloads about 17 GB, then loads the weights onto the device, then warms the engine up
(its KV cache, and decode graphs captured on a GPU): minutes in which a silent process looks hung. Each
phase logs its start and its duration. While it runs, its progress is a tqdm bar when the log goes to a
terminal (stderr, where tqdm draws and the JSON log lines go), and otherwise a JSON log line at most every
MEDMO_PROGRESS_INTERVAL_S: containers, systemd and Kubernetes keep logs, not terminals. /readyz reads
`StartupProgress.state`, so an orchestrator sees why a pod is not ready yet.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    Tqdm = tqdm[Any]
else:
    Tqdm = tqdm  # generic only in its type stubs

logger = logging.getLogger("medmo.startup")

# How often a bar without a terminal refreshes /readyz's percentage (its log lines are rarer).
PERCENT_REFRESH_S = 0.5


class Phase(StrEnum):
    DOWNLOADING = "downloading"
    LOADING = "loading"
    WARMING_UP = "warming_up"


@dataclass(frozen=True)
class PhaseState:
    phase: Phase
    percent: float | None = None


class StartupProgress:
    """The phase a start is in and how far along it is, for /readyz, and the bars that show it.

    Phases run on a loading thread while the event loop answers probes: the state is replaced whole, never
    changed in place, so a reader sees one consistent value without a lock.
    """

    def __init__(self, *, interval_s: float = 10.0, interactive: bool | None = None) -> None:
        self.interval_s = interval_s
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._state: PhaseState | None = None
        self._bars: list[Tqdm] = []

    @property
    def state(self) -> PhaseState | None:
        return self._state

    @contextmanager
    def phase(
        self, phase: Phase, began: str, ended: str, *, measured: bool = False, **fields: object
    ) -> Iterator[None]:
        """Log `began`, run the phase, then log `ended` with its duration. A phase that fails logs no end:
        the error that stops the start says why. A `measured` phase knows its total before it starts (a
        download's bytes), so it is at 0 % from its first moment rather than of unknown progress."""
        self._state = PhaseState(phase, 0.0 if measured else None)
        logger.info(began, extra={"fields": {"phase": phase.value, **fields}})
        started = time.monotonic()
        # On a terminal, log lines written while bars are drawn would break them: tqdm writes them above.
        redirect = logging_redirect_tqdm() if self.interactive else nullcontext()
        try:
            with redirect:
                try:
                    yield
                finally:
                    self._close_bars()  # while tqdm still writes the log lines above them
        finally:
            self._state = None
        duration_s = time.monotonic() - started
        logger.info(
            f"{ended} in {duration_s:.1f} s",
            extra={"fields": {"phase": phase.value, "duration_s": round(duration_s, 3), **fields}},
        )

    def report(self, percent: float) -> None:
        state = self._state
        if state is not None:
            self._state = PhaseState(state.phase, round(min(max(percent, 0.0), 100.0), 1))

    def bar(self, *args: Any, **kwargs: Any) -> PhaseBar:
        """A bar for the current phase (tqdm's arguments); closed when the phase ends if not before."""
        bar = PhaseBar(*args, progress=self, **kwargs)
        self._bars.append(bar)
        return bar

    def counter(self, desc: str, unit: str) -> Callable[[int, int], None]:
        """A callback for work that reports (done, total) as it goes, shown as a bar of the current phase."""
        bars: list[PhaseBar] = []

        def advance(done: int, total: int) -> None:
            if not bars:
                bars.append(self.bar(total=total, desc=desc, unit=unit))
            bars[0].update(done - bars[0].n)

        return advance

    def _close_bars(self) -> None:
        while self._bars:
            self._bars.pop().close()


class PhaseBar(Tqdm):
    """A tqdm bar whose percentage /readyz reports. On a terminal it draws as tqdm does. Otherwise its display
    is a JSON log line at most every interval: `display()` is the method tqdm documents overriding for
    another front end (its Slack and Telegram bars do the same), so tqdm still counts, times and smooths
    the rate, and says when to refresh.

    `details` adds fields to each log line (the download's files in flight).
    """

    def __init__(
        self,
        *args: Any,
        progress: StartupProgress,
        details: Callable[[], Mapping[str, object]] | None = None,
        **kwargs: Any,
    ) -> None:
        # Set before tqdm's __init__, which displays the bar once.
        self._progress = progress
        self._details = details
        self._logged = not progress.interactive
        self._last_line = time.monotonic()
        if self._logged:
            kwargs["file"] = io.StringIO()  # nothing is drawn; tqdm still writes a line end on close
            kwargs["mininterval"] = min(progress.interval_s, PERCENT_REFRESH_S)
            kwargs["miniters"] = 1  # tqdm's adaptive count would go quiet after a burst of small files
        super().__init__(*args, **kwargs)

    # tqdm's close() reads the result (true: something was shown); its type stubs say None.
    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # type: ignore[override]
        if self.total:
            self._progress.report(100 * self.n / self.total)
        if not self._logged:
            return bool(super().display(msg, pos))
        now = time.monotonic()
        if now - self._last_line >= self._progress.interval_s:
            self._last_line = now
            self._log_line()
        return True

    def _log_line(self) -> None:
        numbers = self.format_dict
        done, total, rate = numbers["n"], numbers["total"], numbers["rate"]
        if rate is None and numbers["elapsed"]:
            rate = done / numbers["elapsed"]  # tqdm's smoothed rate is gone once the bar closes: the average
        fields: dict[str, object] = {"done": done, "total": total, "unit": self.unit}
        state = self._progress.state
        if state is not None:
            fields["phase"] = state.phase.value
        words = [f"{self.desc}:"]
        if total:
            fields["percent"] = round(100 * done / total, 1)
            words.append(f"{100 * done / total:.0f}% ({self._amount(done)} of {self._amount(total)})")
        else:
            words.append(self._amount(done))
        if rate:
            fields["rate_per_s"] = round(rate, 1)
            words.append(f"at {self._amount(rate)}/s")
            if total:
                eta_s = (total - done) / rate
                fields["eta_s"] = round(eta_s)
                words.append(f"{tqdm.format_interval(eta_s)} left")
        if self._details is not None:
            fields.update(self._details())
        logger.info(" ".join(words), extra={"fields": fields})

    def _amount(self, value: float) -> str:
        if self.unit_scale:
            return str(tqdm.format_sizeof(value, self.unit, 1000))
        return f"{value:,.0f} {self.unit}" if value >= 10 else f"{value:.2g} {self.unit}"


# The bar transformers shows while it puts the weights on the device (core_model_loading.py).
TRANSFORMERS_LOADING_BAR = "Loading weights"


@contextmanager
def transformers_bars(progress: StartupProgress) -> Iterator[None]:
    """While transformers loads a model, its weight-loading bar is the current phase's; its other bars are
    drawn on a terminal and stay silent otherwise. `set_tqdm_hook` is transformers' own hook for this."""
    from transformers.utils import logging as transformers_logging

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") == TRANSFORMERS_LOADING_BAR:
            return progress.bar(*args, **{**kwargs, "desc": "loading", "unit": "tensors"})
        if progress.interactive:
            return factory(*args, **kwargs)
        return Tqdm(*args, **{**kwargs, "disable": True})

    previous = transformers_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        transformers_logging.set_tqdm_hook(previous)
