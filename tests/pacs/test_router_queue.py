"""The router's durable queue (docker/orthanc/medmo_queue.py) on a real SQLite file: what Orthanc's news of
a series does to it, also while the series is being planned and across a restart; one request per series
and task; and a queue file of the earlier version's per-instance items, read as one-image requests."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

from medmo_queue import Image, Queue, WorkItem

ITEM = WorkItem(
    "series-a", "report", "1.2.3", (Image("instance-1", "slice 1 of 2"), Image("instance-2", "slice 2 of 2"))
)

# The earlier version's queue file, as it created it: its work items were an instance and a task.
PER_INSTANCE_SCHEMA = """
CREATE TABLE series (
    id TEXT PRIMARY KEY,
    stable INTEGER NOT NULL,
    due REAL,
    events INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE work (
    instance_id TEXT NOT NULL,
    task TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    PRIMARY KEY (instance_id, task)
);
CREATE INDEX work_by_due ON work (due);
"""


def write_per_instance_queue(path: Path, work: Sequence[tuple[str, str, str, int, float]]) -> None:
    """A queue file as the earlier version left it, holding `work`: (instance ID, task, Series Instance
    UID, attempts, due)."""
    with sqlite3.connect(path) as old:
        old.executescript(PER_INSTANCE_SCHEMA)
        old.executemany("INSERT INTO work VALUES (?, ?, ?, ?, ?)", work)
    old.close()


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
    later = WorkItem("series-b", "report", "1.2.4", (Image("instance-3"),))
    queue.series_stable("series-b", now=100.0)
    queue.planned("series-b", [later], now=100.0, events=queue.series_events("series-b"))
    queue.retry_later(later, attempts=1, due=130.0)
    assert queue.next_due() == 100.0
    assert queue.next_due(busy_work=[ITEM.key]) == 130.0
    queue.series_stable("series-c", now=120.0)
    assert queue.next_due(busy_work=[ITEM.key]) == 120.0
    assert queue.next_due(busy_series=["series-c"], busy_work=[ITEM.key]) == 130.0


def test_a_series_planned_again_while_its_request_waits_updates_that_request(tmp_path: Path) -> None:
    queue = Queue(str(tmp_path / "queue.sqlite"))
    queue.series_stable("series-a", now=100.0)
    queue.planned("series-a", [ITEM], now=100.0, events=queue.series_events("series-a"))
    queue.retry_later(ITEM, attempts=2, due=150.0)
    # The series grew by a slice before the service answered: the same request, its images chosen anew.
    grown = WorkItem(
        "series-a",
        "report",
        "1.2.3",
        (Image("instance-1", "slice 1 of 3"), Image("instance-3", "slice 3 of 3")),
    )
    queue.series_stable("series-a", now=120.0)
    queue.planned("series-a", [grown], now=120.0, events=queue.series_events("series-a"))
    assert queue.counts()["work_pending"] == 1
    assert queue.due_work(now=149.0, busy=()) is None  # its backoff stands
    assert queue.due_work(now=150.0, busy=()) == WorkItem(
        "series-a", "report", "1.2.3", grown.images, attempts=2
    )


def test_a_request_holds_its_images_and_its_priors_in_the_order_sent(tmp_path: Path) -> None:
    path = str(tmp_path / "queue.sqlite")
    queue = Queue(path)
    compared = WorkItem(
        "series-a",
        "vqa:effusion",
        "1.2.3",
        (Image("instance-2", "current, 2025-03-12, PA"), Image("instance-1", "current, 2025-03-12, LL")),
        (Image("instance-9", "prior, 2024-01-05, PA"),),
    )
    queue.series_stable("series-a", now=100.0)
    queue.planned("series-a", [compared, ITEM], now=100.0, events=queue.series_events("series-a"))
    queue.close()
    restarted = Queue(path)
    assert restarted.due_work(now=100.0, busy=()) == compared
    assert restarted.due_work(now=100.0, busy=[compared.key]) == ITEM
    assert not compared.per_instance


def test_a_queue_file_of_per_instance_items_is_read_as_one_image_requests(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    write_per_instance_queue(
        path, [("instance-1", "report", "1.2.3", 3, 130.0), ("instance-2", "report", "1.2.3", 0, 100.0)]
    )
    queue = Queue(str(path))
    # Each is the request it was, with its attempts and due time: the second is due first.
    second = queue.due_work(now=100.0, busy=())
    assert second == WorkItem("instance-2", "report", "1.2.3", (Image("instance-2"),))
    assert second is not None
    assert second.per_instance
    assert second.about() == "instance instance-2"
    assert queue.due_work(now=100.0, busy=[second.key]) is None
    assert queue.due_work(now=130.0, busy=[second.key]) == WorkItem(
        "instance-1", "report", "1.2.3", (Image("instance-1"),), attempts=3
    )
    queue.remove(second)
    queue.close()
    # Taken over once: the earlier table is gone, and opening the file again changes nothing.
    again = Queue(str(path))
    assert again.counts()["work_pending"] == 1
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "work" not in tables


def test_stat_work_is_sent_first_and_a_queue_file_without_priorities_is_routine(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite"
    queue = Queue(str(path))
    for name, priority in (("routine", "routine"), ("urgent", "urgent"), ("stat", "stat")):
        item = WorkItem(f"series-{name}", "report", "1.2.3", (Image(f"instance-{name}"),), priority=priority)
        queue.series_stable(item.resource_id, now=100.0)
        queue.planned(
            item.resource_id, [item], now=100.0 + len(name), events=queue.series_events(item.resource_id)
        )
    sent = []
    while (item := queue.due_work(now=200.0, busy=())) is not None:
        sent.append((item.resource_id, item.priority))
        queue.remove(item)
    assert sent == [("series-stat", "stat"), ("series-urgent", "urgent"), ("series-routine", "routine")]

    older = tmp_path / "older.sqlite"
    with sqlite3.connect(older) as old:  # a request table from before priorities
        old.execute(
            "CREATE TABLE requests (resource_id TEXT NOT NULL, task TEXT NOT NULL, series_uid TEXT NOT NULL, "
            "images TEXT NOT NULL, prior_images TEXT NOT NULL DEFAULT '[]', attempts INTEGER NOT NULL DEFAULT 0, "
            "due REAL NOT NULL, PRIMARY KEY (resource_id, task))"
        )
        old.execute(
            "INSERT INTO requests VALUES ('series-a', 'report', '1.2.3', '[[\"instance-1\", \"\"]]', '[]', 0, 1.0)"
        )
    waiting = Queue(str(older)).due_work(now=2.0, busy=())
    assert waiting is not None
    assert waiting.priority == "routine"
