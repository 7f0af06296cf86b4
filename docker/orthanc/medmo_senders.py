"""Series-level routing from Orthanc to MedMO Serve: the threads that plan series and send their images.

What happens to a series:
1. Orthanc reports a new series: it is recorded in the queue file as arriving. Orthanc keeps the series it
   waits on to become stable in memory only; the record lets a restart pick up a series Orthanc forgot.
2. Orthanc reports the series stable (no new instance for "StableAge" seconds): the modality's rule picks
   the instances to send, in anatomical order (every instance of a projection series, up to MaxImages; of
   a cross-sectional one the middle slice by position, or "Instances" slices evenly spaced through the
   volume), each captioned ("slice 21 of 40", or the view: "PA"). With "Prior", report and vqa requests
   also hold the latest earlier study of the same patient and modality (found with /tools/find), chosen
   by the same rule within what MaxImages leaves, captioned "prior, 2024-03-12, ..." after the series'
   own "current, 2025-03-12, ...". One work item per task not already done for the series is queued,
   in the transaction that removes the series record: one request, one answer, per series and task.
3. Senders take due work items and send each as one multipart/form-data request holding its images. An
   answer (a DICOM SR or presentation state, referencing every image sent) is stored into Orthanc, in the
   series' study, and the task is added to the series' "MedMORouted" metadata.

   "Done" is per series and task: a task recorded on the series (or, by the earlier version that sent
   each instance alone, on one of the instances chosen now) is not asked again. So a series stored
   again, or grown by a few images and stable again, files nothing new; a series that grows while its
   request still waits is sent as it is by then.

   429, 503, an unreachable service and the like are retried with exponential backoff, never sooner than
   the service's Retry-After, and hold all sending until then: the service is overloaded or down, not the
   item. After `MaxAttempts` an item is dropped and reported in Orthanc's log with its Series Instance UID
   only. Other refusals (422: not an image the model can use, ...) are reported at once: sending again
   would not change the answer.

The queue is an SQLite file beside Orthanc's index (`medmo_queue.py`), so stopping Orthanc or the service
at any point loses nothing. Logs carry Orthanc identifiers (hashes), task names, counts, statuses and, for
failures, the Series Instance UID: never patient data (captions, which carry study dates, are sent, never
logged). SRs, presentation states and other objects that are not images are never routed, so answers do
not come back as questions.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from medmo_queue import Image, Queue, WorkItem
from medmo_routing import (
    CROSS_SECTIONAL,
    LOG_PREFIX,
    MISCONFIGURED,
    NOT_IMAGES,
    ROUTED,
    Answer,
    Chosen,
    ModalityRule,
    RouterSettings,
    Slice,
    Task,
    Upload,
    ask,
    caption,
    choose,
    comparable_series,
    earlier_studies,
    image_counts,
    is_dicom_file,
    prior_query,
    request_id,
    study_priority,
    tag,
    view_label,
)


class ResourceGoneError(Exception):
    """Orthanc no longer has the series or instance (deleted meanwhile)."""


class OrthancApi(Protocol):
    """What the router needs of Orthanc: its REST API (from inside) and its log."""

    def get_json(self, uri: str) -> Any: ...  # raises ResourceGoneError on an unknown resource

    def get_bytes(self, uri: str) -> bytes: ...

    def post_json(self, uri: str, body: Any) -> Any: ...

    def store(self, dicom: bytes) -> str: ...  # the stored instance's Orthanc ID

    def put(self, uri: str, body: str) -> None: ...

    def log_info(self, message: str) -> None: ...

    def log_warning(self, message: str) -> None: ...


@dataclass
class Counters:
    series_planned: int = 0
    sent: int = 0
    stored: int = 0
    retried: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Comparison:
    """A series' study date, and the series of the patient's latest earlier study it is compared with."""

    study_date: str  # YYYYMMDD, the current study's
    prior_series_id: str  # Orthanc's
    prior_date: str  # YYYYMMDD
    prior_slices: list[Slice]


@dataclass
class Router:
    settings: RouterSettings
    orthanc: OrthancApi
    queue: Queue
    clock: Callable[[], float] = time.time
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._wake = threading.Condition()
        self._stopping = False
        self._busy_series: set[str] = set()
        self._busy_work: set[tuple[str, str]] = set()
        # Nothing is sent before this time: the service asked for a pause or could not be reached.
        self._hold_until = 0.0
        self._failures_in_a_row = 0
        # Read-modify-write of an instance's metadata by two senders must not lose a task.
        self._metadata_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # --- lifecycle and events (called from Orthanc's callbacks) ---

    def start(self) -> None:
        resumed = self.queue.resume(self.clock(), self.settings.stable_age_s)
        counts = self.queue.counts()
        self.orthanc.log_info(
            f"{LOG_PREFIX}routing to {self.settings.url}; {counts['work_pending']} queued, "
            f"{resumed} series interrupted by a restart"
        )
        for number in range(self.settings.senders):
            thread = threading.Thread(target=self._run, name=f"medmo-router-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 5.0) -> None:
        """What is being sent stays queued, and is sent again after the restart."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def series_arrived(self, series_id: str) -> None:
        self.queue.series_arrived(series_id)

    def series_stable(self, series_id: str) -> None:
        self.queue.series_stable(series_id, self.clock())
        with self._wake:
            self._wake.notify()

    def status(self) -> dict[str, Any]:
        """What is queued (in the file) and what happened since Orthanc started, for GET /medmo/queue."""
        with self._wake:
            held_s = max(0.0, self._hold_until - self.clock())
            in_flight = len(self._busy_work)
            counters = vars(self.counters).copy()
        return {**self.queue.counts(), "in_flight": in_flight, "held_for_s": round(held_s, 3), **counters}

    def _count(self, counter: str) -> None:
        with self._wake:
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)

    # --- the senders ---

    def _run(self) -> None:
        while True:
            try:
                job = self._next_job()
            except Exception as error:  # the queue file unreadable for a moment (disk full, locked)
                self.orthanc.log_warning(f"{LOG_PREFIX}reading the queue failed ({type(error).__name__})")
                time.sleep(1.0)
                continue
            if job is None:
                return
            self._do(job)

    def _do(self, job: tuple[str, str | WorkItem]) -> None:
        """One job; whatever fails in it, the sender goes on to the next."""
        kind, key = job
        try:
            if kind == "series":
                self._plan(str(key))
            else:
                assert isinstance(key, WorkItem)
                self._send(key)
        except Exception as error:  # one bad job must not stop the sender
            # Orthanc refusing to store an answer (disk full), a REST call failing: the job stays
            # queued and is tried again later, within the same limit as a failing service.
            try:
                self._unexpected(job, type(error).__name__)
            except Exception as second:  # the queue file failing too: the job is still in it
                self.orthanc.log_warning(
                    f"{LOG_PREFIX}recording a failed job failed ({type(second).__name__})"
                )
        finally:
            with self._wake:
                if kind == "series":
                    self._busy_series.discard(str(key))
                else:
                    assert isinstance(key, WorkItem)
                    self._busy_work.discard(key.key)
                self._wake.notify_all()

    def _next_job(self) -> tuple[str, str | WorkItem] | None:
        """The next due series to plan, else the next due work item (unless sending is held); None once
        stopping. Waits until something is due."""
        with self._wake:
            while not self._stopping:
                now = self.clock()
                series = self.queue.due_series(now, self._busy_series)
                if series is not None:
                    self._busy_series.add(series)
                    return "series", series
                if now >= self._hold_until:
                    item = self.queue.due_work(now, self._busy_work)
                    if item is not None:
                        self._busy_work.add(item.key)
                        return "work", item
                due = self.queue.next_due(self._busy_series, self._busy_work)
                if due is not None and due <= now:
                    # Due but held (those in other senders' hands are not counted): the hold's end, or a
                    # finishing job (which notifies), is the next chance.
                    due = self._hold_until if now < self._hold_until else math.inf
                wake_at = min(due if due is not None else math.inf, now + 30.0)
                self._wake.wait(max(0.01, wake_at - now))
        return None

    def _unexpected(self, job: tuple[str, str | WorkItem], error: str) -> None:
        kind, key = job
        if kind == "series":
            self.orthanc.log_warning(
                f"{LOG_PREFIX}planning series {key} failed ({error}); trying again later"
            )
            self.queue.retry_series(str(key), self.clock() + self.settings.retry.max_delay_s)
            return
        assert isinstance(key, WorkItem)
        attempts = key.attempts + 1
        if attempts >= self.settings.retry.max_attempts:
            self._give_up(key, f"{error} after {attempts} attempts")
            return
        self.queue.retry_later(key, attempts, self.clock() + self.settings.retry.delay(attempts))
        self.orthanc.log_warning(f"{LOG_PREFIX}{key.task} of {key.about()}: {error}; retrying later")

    def _plan(self, series_id: str) -> None:
        events = self.queue.series_events(series_id)  # news arriving from now on plans it again
        try:
            series = self.orthanc.get_json(f"/series/{series_id}")
        except ResourceGoneError:
            self.queue.planned(series_id, [], self.clock(), events)
            return
        if not series.get("IsStable", True):
            # Instances arrive again (a modality resending after Orthanc restarted): Orthanc watches it now.
            self.queue.wait_for_stability(series_id)
            return
        modality = tag(series, "Modality").upper()
        rule = None if modality in NOT_IMAGES else self.settings.modalities.get(modality)
        if rule is None or not rule.tasks:
            self.queue.planned(series_id, [], self.clock(), events)
            self._count("series_planned")
            return
        slices = [
            Slice.from_orthanc(entry) for entry in self.orthanc.get_json(f"/series/{series_id}/instances")
        ]
        # The images a request without a prior holds: where the earlier version recorded its tasks.
        chosen = choose(slices, rule.instances or self.settings.max_images)
        # A first look at what is done, to spare looking for a prior for a series stored again.
        with self._metadata_lock:
            done = self._tasks_done(series_id, chosen)
        to_do = [task for task in rule.tasks if task.name not in done]
        comparison = (
            self._comparison(series, modality) if rule.prior and any(t.compares for t in to_do) else None
        )
        priority = rule.priority or self._study_priority(slices)
        planned = self._requests(series_id, series, rule, slices, to_do, comparison, priority)
        # Under the metadata lock from reading what was done to queueing the rest: a sender filing an
        # answer in between would otherwise see its task queued again, and the answer filed twice.
        with self._metadata_lock:
            done = self._tasks_done(series_id, chosen)
            items = [item for item in planned if item.task not in done]
            self.queue.planned(series_id, items, self.clock(), events)
        self._count("series_planned")
        # Also when nothing is left to send: the series was stored again, and that was noticed.
        compared = ""
        if comparison is not None and any(item.prior_images for item in items):
            compared = f", compared with series {comparison.prior_series_id}"
        self.orthanc.log_info(f"{LOG_PREFIX}series {series_id} ({modality}): {len(items)} to send{compared}")
        with self._wake:
            self._wake.notify_all()

    def _requests(
        self,
        series_id: str,
        series: Any,
        rule: ModalityRule,
        slices: list[Slice],
        tasks: list[Task],
        comparison: Comparison | None,
        priority: str,
    ) -> list[WorkItem]:
        """One work item per task: the series' chosen images, captioned, then its prior's when the task
        compares, as many as MaxImages leaves."""
        modality = tag(series, "Modality").upper()
        wanted = rule.instances or self.settings.max_images
        captioned: dict[tuple[str, int], list[Image]] = {}  # by series and count: views are read once

        def images(of_series: str, its_slices: list[Slice], count: int) -> list[Image]:
            if (of_series, count) not in captioned:
                captioned[of_series, count] = self._captioned(choose(its_slices, count), modality)
            return captioned[of_series, count]

        items = []
        for task in tasks:
            compared = comparison if task.compares else None
            current_count, prior_count = image_counts(wanted, self.settings.max_images, compared is not None)
            current = images(series_id, slices, current_count)
            prior: list[Image] = []
            if compared is not None:
                current = [
                    Image(image.instance_id, caption(image.caption, "current", compared.study_date))
                    for image in current
                ]
                prior = [
                    Image(image.instance_id, caption(image.caption, "prior", compared.prior_date))
                    for image in images(compared.prior_series_id, compared.prior_slices, prior_count)
                ]
            uid = tag(series, "SeriesInstanceUID")
            items.append(WorkItem(series_id, task.name, uid, tuple(current), tuple(prior), priority=priority))
        return items

    def _study_priority(self, slices: list[Slice]) -> str:
        """How soon the series' study was asked for, from the tags of one of its instances."""
        if not slices:
            return "routine"
        try:
            return study_priority(
                self.orthanc.get_json(f"/instances/{slices[0].instance_id}/simplified-tags")
            )
        except ResourceGoneError:
            return "routine"

    def _captioned(self, chosen: list[Chosen], modality: str) -> list[Image]:
        """Each image with its place through the volume ("slice 21 of 40"), or a projection image with its
        view ("PA"), as the model reads it."""
        if modality in CROSS_SECTIONAL:
            return [Image(c.instance.instance_id, c.slice_label) for c in chosen]
        return [Image(c.instance.instance_id, self._view_position(c.instance.instance_id)) for c in chosen]

    def _view_position(self, instance_id: str) -> str:
        try:
            return view_label(self.orthanc.get_bytes(f"/instances/{instance_id}/content/0018-5101"))
        except ResourceGoneError:  # no View Position in it (or the instance deleted meanwhile)
            return ""

    def _comparison(self, series: Any, modality: str) -> Comparison | None:
        """The series to compare with, of the patient's latest study of this modality dated before this
        one; None when there is none, or when the patient or the date cannot be told for sure."""
        study = self.orthanc.get_json(f"/studies/{series['ParentStudy']}")
        patient_id, study_date = tag(study, "PatientID", "PatientMainDicomTags"), tag(study, "StudyDate")
        query = prior_query(patient_id, study_date, modality)
        if query is None:
            return None
        for earlier in earlier_studies(self.orthanc.post_json("/tools/find", query), patient_id, study_date):
            found = comparable_series(
                self.orthanc.get_json(f"/studies/{earlier['ID']}/series"), modality, series
            )
            if found is not None:
                prior_slices = [
                    Slice.from_orthanc(entry)
                    for entry in self.orthanc.get_json(f"/series/{found['ID']}/instances")
                ]
                return Comparison(study_date, str(found["ID"]), tag(earlier, "StudyDate"), prior_slices)
        return None

    def _tasks_done(self, series_id: str, chosen: list[Chosen]) -> set[str]:
        """The tasks recorded on the series, and those the earlier version recorded on an instance it sent
        alone, of the instances chosen now. Under the metadata lock."""
        done = self._routed_tasks(f"/series/{series_id}")
        for image in chosen:
            done |= self._routed_tasks(f"/instances/{image.instance.instance_id}")
        return done

    def _routed_tasks(self, resource: str) -> set[str]:
        metadata = self.orthanc.get_json(f"{resource}/metadata?expand")
        return {task for task in str(metadata.get(ROUTED, "")).split(",") if task}

    def _send(self, item: WorkItem) -> None:
        task = next(
            (t for rule in self.settings.modalities.values() for t in rule.tasks if t.name == item.task), None
        )
        if task is None:  # configuration changed since it was queued
            self._give_up(item, "no longer configured")
            return
        images = self._uploads(item.images)
        if not images:
            self.queue.remove(item)
            self.orthanc.log_info(f"{LOG_PREFIX}{item.task} of {item.about()}: deleted, dropped")
            return
        # A prior deleted meanwhile: the series is sent without it.
        images += self._uploads(item.prior_images)
        self._count("sent")
        answer = ask(self.settings, task, images, request_id(item.resource_id, task), item.priority)
        with self._wake:
            if self._stopping:
                # Orthanc is shutting down: its API may be gone. The item stays queued, and is sent
                # again after the restart.
                return
        if answer.status == 200 and is_dicom_file(answer.body):
            self._file(item, answer.body, len(images))
            with self._wake:
                self._failures_in_a_row = 0
            return
        if answer.status == 200:
            self._give_up(
                item, answer.problem or f"the answer is not a DICOM file ({len(answer.body)} bytes)"
            )
        elif answer.retryable:
            self._retry(item, answer)
        else:
            detail = f"{answer.status} {answer.problem}".strip()
            self._give_up(item, f"the service refused it ({detail})")

    def _uploads(self, images: tuple[Image, ...]) -> list[Upload]:
        """The files of `images` that Orthanc still holds, with their captions."""
        uploads = []
        for image in images:
            try:
                uploads.append(
                    Upload(self.orthanc.get_bytes(f"/instances/{image.instance_id}/file"), image.caption)
                )
            except ResourceGoneError:
                continue
        return uploads

    def _file(self, item: WorkItem, answer: bytes, image_count: int) -> None:
        stored = self.orthanc.store(answer)
        try:
            # The series of the images sent (for an item of the earlier version, that of its one instance).
            series_id = str(self.orthanc.get_json(f"/instances/{item.images[0].instance_id}")["ParentSeries"])
        except ResourceGoneError:  # deleted while the service answered: nothing left to record it on
            series_id = None
        with self._metadata_lock:  # see _plan
            if series_id is not None:
                done = self._routed_tasks(f"/series/{series_id}") | {item.task}
                self.orthanc.put(f"/series/{series_id}/metadata/{ROUTED}", ",".join(sorted(done)))
            self.queue.remove(item)
        self._count("stored")
        self.orthanc.log_info(
            f"{LOG_PREFIX}{item.task} of {item.about()} ({image_count} images) stored as {stored}"
        )

    def _retry(self, item: WorkItem, answer: Answer) -> None:
        attempts = item.attempts + 1
        why = f"HTTP {answer.status}" if answer.status is not None else f"unreachable ({answer.problem})"
        why += MISCONFIGURED.get(answer.status or 0, "")
        if attempts >= self.settings.retry.max_attempts:
            self._give_up(item, f"{why} after {attempts} attempts")
            return
        now = self.clock()
        with self._wake:
            self._failures_in_a_row += 1
            pause = self.settings.retry.delay(self._failures_in_a_row, answer.retry_after_s)
            self._hold_until = max(self._hold_until, now + pause)
        # The item itself goes behind the others by its own backoff, so that a long outage spreads the
        # probing over the queue instead of exhausting the attempts of whichever item is first.
        due = now + self.settings.retry.delay(attempts, answer.retry_after_s)
        self.queue.retry_later(item, attempts, due)
        self._count("retried")
        self.orthanc.log_warning(
            f"{LOG_PREFIX}{item.task} of {item.about()}: {why}; sending paused for "
            f"{pause:.3g} s, this one retried in {due - now:.3g} s (attempt {attempts} of "
            f"{self.settings.retry.max_attempts})"
        )

    def _give_up(self, item: WorkItem, why: str) -> None:
        self.queue.remove(item)
        self._count("failed")
        # The one line an operator acts on: the series, by its UID only (no names, no IDs of patients).
        self.orthanc.log_warning(f"{LOG_PREFIX}{item.task} failed for series {item.series_uid}: {why}")
