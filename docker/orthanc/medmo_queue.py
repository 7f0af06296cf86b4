"""Series-level routing from Orthanc to MedMO Serve: the durable queue.

Series waiting to be planned, and work items waiting to be sent, in an SQLite file beside Orthanc's index.
A work item is one request: a task about a series, holding the instances chosen for it (and those of its
prior), with their captions, in the order they are sent. It is keyed by the series and the task, so a
series planned again while its request waits updates that request instead of adding a second one.

Each step commits before the next, so stopping Orthanc (or the service) at any point loses nothing; at
worst an answer stored just before a crash, before the series' metadata is written, is filed twice after
the restart.

A queue file written by the earlier version, whose work items were an instance and a task, is taken as it
is: each of its items becomes a request holding that one instance.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Image:
    """An instance to send, by Orthanc ID, and the caption the model reads before it ("" for none)."""

    instance_id: str
    caption: str = ""


@dataclass(frozen=True)
class WorkItem:
    """One request to send: a task about a series, with the images chosen for it."""

    # Orthanc's ID of the series asked about; of the instance, for an item the earlier version queued.
    resource_id: str
    task: str
    series_uid: str  # for the one log line that reports a failure
    images: tuple[Image, ...]  # of the series, in the order sent
    prior_images: tuple[Image, ...] = ()  # of the latest earlier study, sent after them
    attempts: int = 0
    priority: str = "routine"  # the service's: stat, urgent or routine

    @property
    def key(self) -> tuple[str, str]:
        return self.resource_id, self.task

    @property
    def per_instance(self) -> bool:
        """Queued by the earlier version, which asked about each instance alone."""
        return self.images == (Image(self.resource_id),) and not self.prior_images

    def about(self) -> str:
        """What the item asks about, for the log: Orthanc IDs only."""
        return f"{'instance' if self.per_instance else 'series'} {self.resource_id}"


def _to_json(images: Sequence[Image]) -> str:
    return json.dumps([[image.instance_id, image.caption] for image in images])


def _from_json(text: str) -> tuple[Image, ...]:
    return tuple(Image(str(instance_id), str(caption)) for instance_id, caption in json.loads(text))


class Queue:
    """Series waiting to be planned and work items waiting to be sent, in one SQLite file.

    Every change is its own committed transaction, so whatever stops Orthanc, the file holds either the
    state before a step or the state after it.
    """

    def __init__(self, path: str) -> None:
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        # One connection shared by the plugin's threads, each use under the lock.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS series (
                    id TEXT PRIMARY KEY,
                    stable INTEGER NOT NULL,  -- 0: instances may still arrive
                    due REAL,                 -- when to plan it; NULL: when Orthanc says it is stable
                    events INTEGER NOT NULL DEFAULT 0  -- counts Orthanc's news of it, see planned()
                );
                CREATE TABLE IF NOT EXISTS requests (
                    resource_id TEXT NOT NULL,   -- see WorkItem
                    task TEXT NOT NULL,
                    series_uid TEXT NOT NULL,
                    images TEXT NOT NULL,        -- JSON: [[instance ID, caption], ...] in the order sent
                    prior_images TEXT NOT NULL DEFAULT '[]',
                    attempts INTEGER NOT NULL DEFAULT 0,
                    due REAL NOT NULL,
                    priority TEXT NOT NULL DEFAULT 'routine',
                    PRIMARY KEY (resource_id, task)
                );
                CREATE INDEX IF NOT EXISTS requests_by_due ON requests (due);
                """
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(series)")}
            if "events" not in columns:  # a queue file from before series counted their news
                self._db.execute("ALTER TABLE series ADD COLUMN events INTEGER NOT NULL DEFAULT 0")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
            if "priority" not in columns:  # a queue file from before requests had priorities
                self._db.execute("ALTER TABLE requests ADD COLUMN priority TEXT NOT NULL DEFAULT 'routine'")
            self._take_per_instance_work()

    def _take_per_instance_work(self) -> None:
        """The earlier version's work items (an instance and a task), as requests of that one instance, with
        their attempts and due times; in one transaction with dropping its table (under the lock)."""
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "work" not in tables:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute(
                "SELECT instance_id, task, series_uid, attempts, due FROM work ORDER BY rowid"
            ).fetchall()
            self._db.executemany(
                "INSERT OR IGNORE INTO requests (resource_id, task, series_uid, images, attempts, due) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (instance_id, task, series_uid, _to_json([Image(instance_id)]), attempts, due)
                    for instance_id, task, series_uid, attempts, due in rows
                ],
            )
            self._db.execute("DROP TABLE work")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def series_arrived(self, series_id: str) -> None:
        """An instance arrived in the series (its first, or one more after it was planned): Orthanc will
        call it stable once it is quiet, or, after a restart, resume() will."""
        with self._lock:
            self._db.execute(
                "INSERT INTO series (id, stable, due, events) VALUES (?, 0, NULL, 1) ON CONFLICT (id) "
                "DO UPDATE SET stable = 0, due = NULL, events = events + 1",
                (series_id,),
            )

    def series_stable(self, series_id: str, now: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO series (id, stable, due, events) VALUES (?, 1, ?, 1) ON CONFLICT (id) "
                "DO UPDATE SET stable = 1, due = excluded.due, events = events + 1",
                (series_id, now),
            )

    def series_events(self, series_id: str) -> int:
        """How much news of the series has come so far: read before planning it, given to planned()."""
        with self._lock:
            row = self._db.execute("SELECT events FROM series WHERE id = ?", (series_id,)).fetchone()
        return int(row[0]) if row else 0

    def retry_series(self, series_id: str, due: float) -> None:
        """Planning failed: plan it again at `due`, whatever news came meanwhile."""
        with self._lock:
            self._db.execute(
                "INSERT INTO series (id, stable, due, events) VALUES (?, 1, ?, 1) ON CONFLICT (id) "
                "DO UPDATE SET stable = 1, due = excluded.due",
                (series_id, due),
            )

    def resume(self, now: float, stable_age_s: float) -> int:
        """After a restart: Orthanc no longer watches the series that were still arriving, and will never
        call them stable. Plan them once they have been quiet for StableAge, as Orthanc would have."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE series SET due = ? WHERE stable = 0 AND due IS NULL", (now + stable_age_s,)
            )
            return cursor.rowcount

    def wait_for_stability(self, series_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE series SET stable = 0, due = NULL WHERE id = ?", (series_id,))

    def due_series(self, now: float, busy: Iterable[str]) -> str | None:
        busy = set(busy)
        with self._lock:
            # Only as many rows as could be skipped, plus one: the queue may hold thousands.
            rows = self._db.execute(
                "SELECT id FROM series WHERE due IS NOT NULL AND due <= ? ORDER BY due LIMIT ?",
                (now, len(busy) + 1),
            ).fetchall()
        return next((row[0] for row in rows if row[0] not in busy), None)

    def planned(self, series_id: str, items: Iterable[WorkItem], now: float, events: int) -> None:
        """The series' work items replace the series, in one transaction, unless news of it came while it
        was planned (`events`, from series_events() before planning, is behind): an instance that arrived
        meanwhile, or Orthanc calling it stable again. Then the series stays, to be planned again.

        A request of the series for the same task still waiting (the series grew before it was answered)
        is brought up to date, its images the ones chosen now; its attempts and due time stay."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO requests (resource_id, task, series_uid, images, prior_images, attempts, due, "
                    "priority) VALUES (?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (resource_id, task) DO UPDATE SET "
                    "series_uid = excluded.series_uid, images = excluded.images, "
                    "prior_images = excluded.prior_images, priority = excluded.priority",
                    [
                        (
                            item.resource_id,
                            item.task,
                            item.series_uid,
                            _to_json(item.images),
                            _to_json(item.prior_images),
                            now,
                            item.priority,
                        )
                        for item in items
                    ],
                )
                self._db.execute("DELETE FROM series WHERE id = ? AND events <= ?", (series_id, events))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def due_work(self, now: float, busy: Iterable[tuple[str, str]]) -> WorkItem | None:
        """The first due work item whose key (`WorkItem.key`) is not in `busy`."""
        busy = set(busy)
        with self._lock:
            # Stat work first, then urgent, then routine, each in the order it fell due.
            rows = self._db.execute(
                "SELECT resource_id, task, series_uid, images, prior_images, attempts, priority FROM requests "
                "WHERE due <= ? ORDER BY CASE priority WHEN 'stat' THEN 0 WHEN 'urgent' THEN 1 ELSE 2 END, "
                "due, rowid LIMIT ?",
                (now, len(busy) + 1),
            ).fetchall()
        for resource_id, task, series_uid, images, prior_images, attempts, priority in rows:
            if (resource_id, task) not in busy:
                return WorkItem(
                    resource_id,
                    task,
                    series_uid,
                    _from_json(images),
                    _from_json(prior_images),
                    attempts,
                    priority,
                )
        return None

    def retry_later(self, item: WorkItem, attempts: int, due: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE requests SET attempts = ?, due = ? WHERE resource_id = ? AND task = ?",
                (attempts, due, *item.key),
            )

    def remove(self, item: WorkItem) -> None:
        with self._lock:
            self._db.execute("DELETE FROM requests WHERE resource_id = ? AND task = ?", item.key)

    def next_due(
        self, busy_series: Iterable[str] = (), busy_work: Iterable[tuple[str, str]] = ()
    ) -> float | None:
        """When the next series or work item not in a sender's hands falls due (those in hand keep the due
        time that got them picked, long past)."""
        busy_series, busy_work = set(busy_series), set(busy_work)
        with self._lock:
            series = self._db.execute(
                "SELECT id, due FROM series WHERE due IS NOT NULL ORDER BY due LIMIT ?",
                (len(busy_series) + 1,),
            ).fetchall()
            work = self._db.execute(
                "SELECT resource_id, task, due FROM requests ORDER BY due LIMIT ?", (len(busy_work) + 1,)
            ).fetchall()
        dues = [due for series_id, due in series if series_id not in busy_series]
        dues += [due for resource_id, task, due in work if (resource_id, task) not in busy_work]
        return min(dues) if dues else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            arriving = self._db.execute("SELECT COUNT(*) FROM series WHERE stable = 0").fetchone()[0]
            stable = self._db.execute("SELECT COUNT(*) FROM series WHERE stable = 1").fetchone()[0]
            work, retried = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0) FROM requests"
            ).fetchone()
        return {
            "series_arriving": arriving,
            "series_to_plan": stable,
            "work_pending": work,
            "work_failed_before": retried,
        }
