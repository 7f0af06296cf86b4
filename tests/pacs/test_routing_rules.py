"""The Orthanc router's rules, outside Orthanc: which slices stand for a series, how long to wait after a
failure, and which configurations are refused (tests/pacs/test_orthanc.py runs them inside Orthanc)."""

from __future__ import annotations

import email.utils
import math
import random
from typing import Any

import pytest
from medmo_routing import (
    ConfigurationError,
    RetryPolicy,
    RouterSettings,
    Slice,
    choose,
    evenly_spaced,
    ordered,
    parse_retry_after,
)

from tests.pacs.orthanc import shipped_configuration


def orthanc_entry(
    number: int | None, position: list[float] | None, orientation: list[float] | None = None
) -> dict[str, Any]:
    """An entry of Orthanc's /series/{id}/instances, its tags written as Orthanc writes them."""
    tags: dict[str, str] = {"SOPInstanceUID": f"1.2.3.{number}"}
    if number is not None:
        tags["InstanceNumber"] = str(number)
    if position is not None:
        tags["ImagePositionPatient"] = "\\".join(f"{value:g}" for value in position)
        tags["ImageOrientationPatient"] = "\\".join(f"{v:g}" for v in orientation or [1, 0, 0, 0, 1, 0])
    return {"ID": f"orthanc-{number}", "MainDicomTags": tags}


def test_the_middle_slice_is_found_by_position_whatever_the_numbering_and_the_order_of_arrival() -> None:
    # Numbered from the top (feet-first), stored in random order: the 21st from the bottom is the middle.
    entries = [orthanc_entry(40 - index, [0, 0, -50 + 2.5 * index]) for index in range(40)]
    random.Random(7).shuffle(entries)
    slices = [Slice.from_orthanc(entry) for entry in entries]
    (middle,) = choose(slices, 1)
    assert middle.position == (0.0, 0.0, 0.0)
    assert middle.instance_number == 20
    assert [s.position[2] for s in ordered(slices) if s.position] == [-50 + 2.5 * i for i in range(40)]


def test_several_slices_are_spread_evenly_through_the_volume() -> None:
    assert evenly_spaced(40, 1) == [20]
    assert evenly_spaced(41, 1) == [20]
    assert evenly_spaced(40, 3) == [6, 20, 33]
    assert evenly_spaced(2, 5) == [0, 1]
    entries = [orthanc_entry(index + 1, [0, 0, float(index)]) for index in range(10)]
    chosen = choose([Slice.from_orthanc(entry) for entry in entries], 2)
    assert [s.instance_number for s in chosen] == [3, 8]


def test_an_oblique_stack_is_ordered_along_its_own_normal() -> None:
    # Tilted 30 degrees about x: rows along x, columns along (0, cos, sin); the normal is (0, -sin, cos).
    tilt = math.radians(30)
    orientation = [1, 0, 0, 0, math.cos(tilt), math.sin(tilt)]
    normal = (0.0, -math.sin(tilt), math.cos(tilt))
    # Slice k sits k mm along the normal, plus an in-plane offset that grows the other way: ordering by
    # z alone, or by the offset, would reverse or scramble them.
    entries = [
        orthanc_entry(
            k + 1,
            [5.0 * k, normal[1] * k - 3.0 * k * math.cos(tilt), normal[2] * k - 3.0 * k * math.sin(tilt)],
            orientation,
        )
        for k in (4, 0, 3, 1, 2)
    ]
    assert [s.instance_number for s in ordered([Slice.from_orthanc(e) for e in entries])] == [1, 2, 3, 4, 5]


def test_a_localizer_in_the_series_is_left_out_and_numbers_decide_without_positions() -> None:
    axial = [orthanc_entry(index + 1, [0, 0, float(index)]) for index in range(5)]
    localizer = orthanc_entry(99, [0, 0, 100], [0, 1, 0, 0, 0, -1])
    assert [s.instance_number for s in ordered([Slice.from_orthanc(e) for e in [localizer, *axial]])] == [
        1,
        2,
        3,
        4,
        5,
    ]
    unpositioned = [orthanc_entry(number, None) for number in (3, 1, None, 2)]
    assert [s.instance_number for s in ordered([Slice.from_orthanc(e) for e in unpositioned])] == [
        1,
        2,
        3,
        None,
    ]


def test_every_instance_of_a_projection_series_is_sent() -> None:
    entries = [orthanc_entry(number, None) for number in (2, 1)]
    assert [s.instance_id for s in choose([Slice.from_orthanc(e) for e in entries], None)] == [
        "orthanc-1",
        "orthanc-2",
    ]


def test_the_wait_doubles_up_to_its_cap_and_is_never_shorter_than_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, first_delay_s=2, max_delay_s=20)
    assert [policy.delay(failures) for failures in range(1, 6)] == [2, 4, 8, 16, 20]
    assert policy.delay(1, retry_after_s=7) == 7
    assert policy.delay(4, retry_after_s=7) == 16
    assert policy.delay(10_000) == 20  # a long outage does not overflow
    assert policy.delay(1, retry_after_s=10**9) == 86_400


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after("7", now) == 7
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_the_shipped_configuration_routes_what_it_says() -> None:
    settings = RouterSettings.from_configuration(shipped_configuration())
    assert settings.url == "http://medmo:8000"
    ct, cr = settings.modalities["CT"], settings.modalities["CR"]
    assert (ct.instances, cr.instances) == (1, None)
    assert [task.name for task in cr.tasks] == ["report", "ground", "ground:gsps"]
    assert [(task.route, task.accept) for task in ct.tasks] == [
        ("report", "application/dicom"),
        ("ground", "application/dicom; object=gsps"),
    ]
    assert settings.queue_file == "/var/lib/orthanc/db/medmo-queue.sqlite"
    assert settings.stable_age_s == 60


def test_a_question_is_sent_in_the_query_string_of_vqa() -> None:
    configuration = shipped_configuration()
    configuration["MedMO"]["Modalities"] = {"DX": {"Tasks": ["vqa:effusion"]}}
    (task,) = RouterSettings.from_configuration(configuration).modalities["DX"].tasks
    assert task.url("http://medmo:8000") == "http://medmo:8000/vqa?question=Is+there+a+pleural+effusion%3F"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"Url": "medmo:8000"}, "MedMO.Url"),
        ({"Url": "http://orthanc:secret@medmo:8000"}, "without a login"),
        ({"Modalities": {"CT": {"Tasks": ["reprot"]}}}, "MedMO.Modalities.CT"),
        ({"Modalities": {"CT": {"Tasks": ["vqa:nothing"]}}}, "MedMO.Questions"),
        ({"Modalities": {"SR": {"Tasks": ["report"]}}}, "MedMO.Modalities.SR"),
        ({"Modalities": {"CT": {"Tasks": ["report"], "Instances": 0}}}, "MedMO.Modalities.CT.Instances"),
        ({"Modalities": {"CT": {"Tasks": ["report", "report"]}}}, "listed twice"),
        ({"Retry": {"MaxAttempts": 0}}, "MedMO.Retry.MaxAttempts"),
        ({"TimeoutSeconds": "300"}, "MedMO.TimeoutSeconds"),
    ],
)
def test_a_configuration_that_cannot_route_is_refused_naming_the_setting(
    change: dict[str, Any], named: str
) -> None:
    configuration = shipped_configuration()
    configuration["MedMO"].update(change)
    with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
        RouterSettings.from_configuration(configuration)
