"""The router's durable queue (docker/orthanc/medmo_queue.py) on a real SQLite file: what Orthanc's news of
a series does to it, also while the series is being planned and across a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from medmo_queue import Queue, WorkItem

ITEM = WorkItem("instance-1", "report", "1.2.3")


def test_a_series_is_planned_once_orthanc_calls_it_stable(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "queue.sqlite"))
    queue.series_arrived("series-a")
    queue.series_arrived("series-a")  # its next instance
    assert queue.due_series(now=100.0, busy=()) is None  # still arriving
    queue.series_stable("series-a", now=100.0)
    assert queue.due_series(now=100.0, busy=()) == "series-a"
    queue.planned("series-a", [ITEM], now=100.0, events=queue.series_events("series-a"))
    assert queue.counts() == {
        "series_arriving": 0,
        "series_to_plan": 0,
        "work_pending": 1,
        "work_failed_before": 0,
    }


def test_an_instance_arriving_while_its_series_is_planned_keeps_the_series_queued(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "queue.sqlite"))
    queue.series_arrived("series-a")
    queue.series_stable("series-a", now=100.0)
    events = queue.series_events("series-a")  # the planner starts reading Orthanc
    queue.series_arrived("series-a")  # meanwhile one more instance is stored
    queue.planned("series-a", [ITEM], now=100.0, events=events)
    # What was planned is queued, and the series waits for Orthanc to call it stable again.
    assert queue.counts()["work_pending"] == 1
    assert queue.counts()["series_arriving"] == 1
    assert queue.due_series(now=1e9, busy=()) is None


def test_orthanc_calling_a_series_stable_while_it_is_planned_plans_it_again(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "queue.sqlite"))
    queue.series_stable("series-a", now=100.0)
    events = queue.series_events("series-a")
    queue.series_stable("series-a", now=105.0)
    queue.planned("series-a", [], now=106.0, events=events)
    assert queue.due_series(now=106.0, busy=()) == "series-a"


def test_a_series_grown_after_planning_is_planned_after_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.sqlite")
    queue = Queue(path)
    queue.series_stable("series-a", now=100.0)
    queue.planned("series-a", [], now=100.0, events=queue.series_events("series-a"))
    assert queue.counts()["series_to_plan"] == 0
    queue.series_arrived("series-a")  # a late instance; then Orthanc stops before calling it stable
    queue.close()

    restarted = Queue(path)
    assert restarted.resume(now=200.0, stable_age_s=60.0) == 1
    assert restarted.due_series(now=259.0, busy=()) is None
    assert restarted.due_series(now=260.0, busy=()) == "series-a"


def test_a_queue_file_from_before_series_counted_their_news_is_taken_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE series (id TEXT PRIMARY KEY, stable INTEGER NOT NULL, due REAL)")
        old.execute("INSERT INTO series VALUES ('series-a', 1, 100.0)")
    queue = Queue(str(path))
    assert queue.due_series(now=100.0, busy=()) == "series-a"
    queue.planned("series-a", [ITEM], now=100.0, events=queue.series_events("series-a"))
    assert queue.counts()["series_to_plan"] == 0
    assert queue.counts()["work_pending"] == 1


def test_what_falls_due_next_leaves_out_what_senders_hold(tmp_path: Path) -> None:
    # An item in a sender's hands keeps its long-past due time; an idle sender must wait for the next one.
    queue = Queue(str(tmp_path / "queue.sqlite"))
    queue.series_stable("series-a", now=100.0)
    queue.planned("series-a", [ITEM], now=100.0, events=queue.series_events("series-a"))
    later = WorkItem("instance-2", "report", "1.2.3")
    queue.series_stable("series-b", now=100.0)
    queue.planned("series-b", [later], now=100.0, events=queue.series_events("series-b"))
    queue.retry_later(later, attempts=1, due=130.0)
    assert queue.next_due() == 100.0
    assert queue.next_due(busy_work=[(ITEM.instance_id, ITEM.task)]) == 130.0
    queue.series_stable("series-c", now=120.0)
    assert queue.next_due(busy_work=[(ITEM.instance_id, ITEM.task)]) == 120.0
    assert queue.next_due(busy_series=["series-c"], busy_work=[(ITEM.instance_id, ITEM.task)]) == 130.0
