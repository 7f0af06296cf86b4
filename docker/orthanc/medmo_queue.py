"""Series-level routing from Orthanc to MedMO Serve: the durable queue.

Series waiting to be planned, and work items (an instance and a task) waiting to be sent, in an SQLite file
beside Orthanc's index. Each step commits before the next, so stopping Orthanc (or the service) at any
point loses nothing; at worst an answer stored just before a crash, before its instance's metadata is
written, is filed twice after the restart.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkItem:
    instance_id: str
    task: str
    series_uid: str  # for the one log line that reports a failure
    attempts: int = 0


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
                CREATE TABLE IF NOT EXISTS work (
                    instance_id TEXT NOT NULL,
                    task TEXT NOT NULL,
                    series_uid TEXT NOT NULL,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    due REAL NOT NULL,
                    PRIMARY KEY (instance_id, task)
                );
                CREATE INDEX IF NOT EXISTS work_by_due ON work (due);
                """
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(series)")}
            if "events" not in columns:  # a queue file from before series counted their news
                self._db.execute("ALTER TABLE series ADD COLUMN events INTEGER NOT NULL DEFAULT 0")

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
        meanwhile, or Orthanc calling it stable again. Then the series stays, to be planned again."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO work (instance_id, task, series_uid, attempts, due) "
                    "VALUES (?, ?, ?, 0, ?)",
                    [(item.instance_id, item.task, item.series_uid, now) for item in items],
                )
                self._db.execute("DELETE FROM series WHERE id = ? AND events <= ?", (series_id, events))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def due_work(self, now: float, busy: Iterable[tuple[str, str]]) -> WorkItem | None:
        busy = set(busy)
        with self._lock:
            rows = self._db.execute(
                "SELECT instance_id, task, series_uid, attempts FROM work WHERE due <= ? "
                "ORDER BY due, rowid LIMIT ?",
                (now, len(busy) + 1),
            ).fetchall()
        for instance_id, task, series_uid, attempts in rows:
            if (instance_id, task) not in busy:
                return WorkItem(instance_id, task, series_uid, attempts)
        return None

    def retry_later(self, item: WorkItem, attempts: int, due: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE work SET attempts = ?, due = ? WHERE instance_id = ? AND task = ?",
                (attempts, due, item.instance_id, item.task),
            )

    def remove(self, item: WorkItem) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM work WHERE instance_id = ? AND task = ?", (item.instance_id, item.task)
            )

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
                "SELECT instance_id, task, due FROM work ORDER BY due LIMIT ?", (len(busy_work) + 1,)
            ).fetchall()
        dues = [due for series_id, due in series if series_id not in busy_series]
        dues += [due for instance_id, task, due in work if (instance_id, task) not in busy_work]
        return min(dues) if dues else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            arriving = self._db.execute("SELECT COUNT(*) FROM series WHERE stable = 0").fetchone()[0]
            stable = self._db.execute("SELECT COUNT(*) FROM series WHERE stable = 1").fetchone()[0]
            work, retried = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0) FROM work"
            ).fetchone()
        return {
            "series_arriving": arriving,
            "series_to_plan": stable,
            "work_pending": work,
            "work_failed_before": retried,
        }
