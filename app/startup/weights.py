"""MEDMO_MODEL as a folder that `from_pretrained` loads.

A local folder is used as it is. A hub id is looked up in the Hugging Face cache (HF_HOME) and, unless
HF_HUB_OFFLINE=1, whatever the cache lacks of the files a checkpoint is made of (WEIGHT_PATTERNS) is
downloaded into it first. The model is then loaded from the cache's snapshot folder, never from the hub:
a start serves exactly what was fetched, and `--download-only` followed by an offline start needs
nothing more.

huggingface_hub does the downloading (resumed, over Xet or plain HTTP, into its cache layout); only the
order of the calls is written here, for the progress: its `snapshot_download` draws one aggregate bar
whose total grows as files start, and hands no progress class to each file's download. Asking for the
file list and sizes first (its dry run) gives the total from the first byte, and downloading each file
with `hf_hub_download` lets each report its own bytes.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import DryRunFileInfo, hf_hub_download, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    DryRunError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # documented; its __init__ imports it without re-export
from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

from app.settings import Settings
from app.startup.progress import Phase, PhaseBar, StartupProgress, Tqdm

# What a MedMO (Qwen3-VL) checkpoint is made of: config, generation config and shard index, tokenizer and
# processor (JSON, merges, a chat template), and safetensors weights. Not README files, images, or the
# same weights again in other formats (.bin, .pt, .onnx), which some repositories also hold.
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]
# Files downloaded at once: snapshot_download's own default.
PARALLEL_FILES = 8


class WeightsError(RuntimeError):
    """The weights cannot be found or fetched; the message says why and what to set."""


@dataclass(frozen=True)
class Checkpoint:
    """A folder `from_pretrained` can load, and what it holds."""

    folder: Path
    model_type: str
    files: int
    size_bytes: int
    commit: str | None = None  # for a hub id: the revision's commit


def is_local(model: str) -> bool:
    """A path (absolute, relative or ~), or something that exists on disk: never a hub id."""
    return model.startswith(("/", "./", "../", "~")) or os.path.exists(model)


def resolve(settings: Settings, progress: StartupProgress) -> Checkpoint:
    """The checkpoint to load: a local folder, or a hub id's snapshot, downloaded first where needed."""
    name = settings.model
    if is_local(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise WeightsError(
                f"MEDMO_MODEL={name!r} is not an existing folder: set it to a folder holding MedMO's "
                "weights, or to a hub id such as MBZUAI/MedMO-8B-Next"
            )
        return inspect(folder, name)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise WeightsError(
            f"MEDMO_MODEL={name!r} is neither an existing folder nor a hub id (owner/name, such as "
            "MBZUAI/MedMO-8B-Next): a folder's path must exist here, and a relative one may start with ./"
        ) from None
    if hub_constants.HF_HUB_OFFLINE:
        return cached(settings, "HF_HUB_OFFLINE=1 forbids downloading it")
    try:
        plan = snapshot_download(
            name,
            revision=settings.revision,
            allow_patterns=WEIGHT_PATTERNS,
            dry_run=True,
            tqdm_class=_Silent,
        )
    except (DryRunError, httpx2.TransportError) as exc:
        # The hub did not answer the listing (huggingface_hub wraps most failures, and lets a proxy's pass):
        # like from_pretrained, serve what the cache holds, or say why neither works.
        cause = (exc.__cause__ or exc) if isinstance(exc, DryRunError) else exc
        try:
            return cached(
                settings, f"the hub could not be reached ({type(cause).__name__}: {_first_line(cause)})"
            )
        except WeightsError:
            if _refused(cause):
                raise WeightsError(_hub_refusal(settings, cause)) from cause
            raise
    except HfHubHTTPError as exc:
        raise WeightsError(_hub_refusal(settings, exc)) from exc
    if not plan:
        raise WeightsError(f"the hub repository {name!r} holds no model files ({', '.join(WEIGHT_PATTERNS)})")
    commit = plan[0].commit_hash
    missing = [item for item in plan if item.will_download]
    if missing:
        _download(name, commit, missing, progress)
    try:
        # Everything is in the cache now: this records the file list of the commit (what an offline
        # start checks the snapshot against) and returns the snapshot's folder.
        snapshot = snapshot_download(
            name, revision=commit, allow_patterns=WEIGHT_PATTERNS, tqdm_class=_Silent
        )
    except (HfHubHTTPError, OSError) as exc:
        raise WeightsError(
            f"could not list {name!r} on the hub after downloading it ({_first_line(exc)})"
        ) from exc
    return inspect(Path(snapshot), name, commit=commit)


def cached(settings: Settings, why_not_download: str | None = None) -> Checkpoint:
    """The hub id's snapshot as the cache holds it, without asking the hub; an error if it is not all there.
    `why_not_download` completes the error: why the start could not download what is missing."""
    name = settings.model
    cache = hub_constants.HF_HUB_CACHE
    because = f", and {why_not_download}" if why_not_download else ""
    try:
        folder = snapshot_download(
            name,
            revision=settings.revision,
            allow_patterns=WEIGHT_PATTERNS,
            local_files_only=True,
            tqdm_class=_Silent,
        )
    except IncompleteSnapshotError as exc:
        # huggingface_hub compares the snapshot with the file list recorded when it was downloaded.
        found = re.search(r"\d+ file\(s\) are missing \([^)]*\)", str(exc))
        missing = found.group(0) if found else _first_line(exc)
        raise WeightsError(
            f"the Hugging Face cache ({cache}) holds only part of {name!r}: {missing}{because}: run "
            "`medmo-serve --download-only` where the hub is reachable (with the same HF_HOME) to complete it"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise WeightsError(
            f"{name!r} is not in the Hugging Face cache ({cache}){because}: run `medmo-serve --download-only` "
            "where the hub is reachable (with the same HF_HOME), or set MEDMO_MODEL to a folder holding the weights"
        ) from exc
    return inspect(Path(folder), name, commit=Path(folder).name)


def inspect(folder: Path, name: str, commit: str | None = None) -> Checkpoint:
    """What the folder holds, or a WeightsError naming what a checkpoint needs and it lacks."""

    def lacking(what: str) -> WeightsError:
        return WeightsError(
            f"could not load model {name!r}: {folder} has no {what}: set MEDMO_MODEL to a folder holding "
            "MedMO's weights, or to a hub id"
        )

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise lacking("config.json")
    try:
        model_type = str(json.loads(config_path.read_text()).get("model_type", "unknown"))
    except (OSError, ValueError, AttributeError) as exc:
        raise lacking(f"readable config.json ({type(exc).__name__})") from exc
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise lacking(f"readable model.safetensors.index.json ({type(exc).__name__})") from exc
        absent = [shard for shard in shards if not (folder / shard).is_file()]
        if absent:
            raise lacking(
                f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''} (shards the index names)"
            )
    elif not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise lacking("weights (*.safetensors)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise lacking("tokenizer (tokenizer.json)")
    if (
        not (folder / "preprocessor_config.json").is_file()
        and not (folder / "processor_config.json").is_file()
    ):
        raise lacking("image processor (preprocessor_config.json)")
    files = [path for path in folder.rglob("*") if path.is_file()]
    return Checkpoint(
        folder=folder,
        model_type=model_type,
        files=len(files),
        size_bytes=sum(path.stat().st_size for path in files),
        commit=commit,
    )


def describe(checkpoint: Checkpoint) -> str:
    at = f" at {checkpoint.commit[:12]}" if checkpoint.commit else ""
    size = tqdm.format_sizeof(checkpoint.size_bytes, "B", 1000)
    return f"{checkpoint.model_type}{at}, {checkpoint.files} files, {size} in {checkpoint.folder}"


# --- downloading ------------------------------------------------------------------------------------


def _download(name: str, commit: str, files: Sequence[DryRunFileInfo], progress: StartupProgress) -> None:
    total = sum(item.file_size or 0 for item in files)
    size = tqdm.format_sizeof(total, "B", 1000)
    with progress.phase(
        Phase.DOWNLOADING,
        began=f"downloading {name} at {commit[:12]}: {len(files)} files, {size}",
        ended=f"downloaded {name}",
        measured=total > 0,
        model=name,
        commit=commit,
        files=len(files),
        total_bytes=total,
    ):
        meter = _DownloadMeter(files, progress)

        def fetch(item: DryRunFileInfo) -> None:
            hf_hub_download(name, item.filename, revision=commit, tqdm_class=meter.reporter(item))
            meter.finished(item)

        pool = ThreadPoolExecutor(min(PARALLEL_FILES, len(files)), thread_name_prefix="medmo-download")
        futures = {pool.submit(fetch, item): item for item in files}
        try:
            for future in as_completed(futures):
                try:
                    future.result()
                except Exception as exc:  # whatever failed, the start stops with one sentence naming the file
                    raise WeightsError(
                        f"downloading {futures[future].filename} of {name!r} failed ({type(exc).__name__}: "
                        f"{_first_line(exc)}): start again to resume, or run `medmo-serve --download-only`"
                    ) from exc
        finally:
            # On a failure the files not yet started are dropped; those in flight end by themselves.
            pool.shutdown(wait=True, cancel_futures=True)


class _DownloadMeter:
    """A download's bytes, per file and in total: one bar for the total (a log line without a terminal,
    which lists the files in flight), and on a terminal one bar per file in flight below it."""

    def __init__(self, files: Sequence[DryRunFileInfo], progress: StartupProgress) -> None:
        self._lock = threading.RLock()  # the total bar asks for details() while advance() holds it
        self._progress = progress
        self._count = len(files)
        self._finished = 0
        self._counted: dict[str, int] = {}  # bytes of each file in flight
        self._sizes: dict[str, int] = {}
        self._file_bars: dict[str, Tqdm] = {}
        self.total: PhaseBar = progress.bar(
            total=sum(item.file_size or 0 for item in files),
            desc="downloading",
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            details=self.details,
        )

    def details(self) -> dict[str, object]:
        with self._lock:
            in_flight = [
                {"file": name, "done": done, "total": self._sizes[name]}
                for name, done in self._counted.items()
            ]
        return {"files_done": self._finished, "files_total": self._count, "in_flight": in_flight}

    def reporter(self, item: DryRunFileInfo) -> Any:
        """The class hf_hub_download reports this file's bytes to, in place of a tqdm class."""
        meter = self

        class FileReporter:
            # The calls huggingface_hub makes on a progress class, over plain HTTP (with retries that
            # resume, or restart at a negative update) and over Xet, as its snapshot_download's own
            # aggregating class does.
            def __init__(
                self, *args: object, total: int | None = None, initial: int = 0, **kwargs: object
            ) -> None:
                self.total = item.file_size or total or 0
                meter.started(item.filename, self.total, initial)

            def update(self, n: float | None = 1) -> None:
                meter.advance(item.filename, int(n or 0))

            def update_transfer(self, n: float | None = 1) -> None:
                pass  # bytes off the network (Xet); the bytes written to the file are what is counted

            def set_postfix_str(self, *args: object, **kwargs: object) -> None:
                pass

            def set_transfer_postfix_str(self, *args: object, **kwargs: object) -> None:
                pass

            def close(self) -> None:
                pass

            def __enter__(self) -> FileReporter:
                return self

            def __exit__(self, *exc_info: object) -> None:
                pass

        return FileReporter

    def started(self, name: str, size: int, initial: int) -> None:
        with self._lock:
            if name in self._counted:
                return  # a retry of the same file
            self._counted[name] = 0
            self._sizes[name] = size
            if self._progress.interactive:
                self._file_bars[name] = tqdm(
                    total=size, desc=_short(name), unit="B", unit_scale=True, unit_divisor=1000, leave=False
                )
        self.advance(name, initial)  # resumed from an interrupted download

    def advance(self, name: str, n: int) -> None:
        with self._lock:
            self._counted[name] = self._counted.get(name, 0) + n
            if name in self._file_bars:
                self._file_bars[name].update(n)
            self.total.update(n)

    def finished(self, item: DryRunFileInfo) -> None:
        with self._lock:
            counted = self._counted.pop(item.filename, 0)
            self._sizes.pop(item.filename, None)
            bar = self._file_bars.pop(item.filename, None)
            if bar is not None:
                bar.close()
            self._finished += 1
            # A file that reported less than its size (or nothing: found complete) still counts whole.
            if item.file_size and item.file_size > counted:
                self.total.update(item.file_size - counted)


class _Silent(auto_tqdm):  # type: ignore[type-arg]  # generic only in its type stubs
    """For huggingface_hub's calls whose bars would repeat this module's (the plan and the final listing);
    a subclass of tqdm.auto's class, as huggingface_hub asks of a progress class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _refused(exc: BaseException) -> bool:
    """The hub answered, and the answer is no: not a connection problem that the cache can stand in for."""
    if isinstance(exc, (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError)):
        return True
    return (
        isinstance(exc, HfHubHTTPError)
        and exc.response is not None
        and exc.response.status_code in (401, 403)
    )


def _hub_refusal(settings: Settings, exc: BaseException) -> str:
    name = settings.model
    if isinstance(exc, GatedRepoError):
        return f"{name!r} is gated on the hub: accept its terms there and set HF_TOKEN to a token of that account"
    if isinstance(exc, RevisionNotFoundError):
        return f"the hub repository {name!r} has no revision {settings.revision!r}: set MEDMO_REVISION to a branch, tag or commit it has"
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"the hub has no repository {name!r} (or it is private: set HF_TOKEN): set MEDMO_MODEL to a hub id "
            "such as MBZUAI/MedMO-8B-Next, or to a local folder"
        )
    return f"the hub refused {name!r} ({_first_line(exc)})"
