"""The Orthanc router's rules, outside Orthanc: which slices stand for a series and what each is called,
which earlier study is its prior, how many images of each one request holds, how long to wait after a
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
    caption,
    choose,
    comparable_series,
    earlier_studies,
    evenly_spaced,
    image_counts,
    ordered,
    parse_retry_after,
    prior_query,
    study_priority,
    view_label,
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
    assert middle.instance.position == (0.0, 0.0, 0.0)
    assert middle.instance.instance_number == 20
    assert middle.slice_label == "slice 21 of 40"  # counted from the bottom, as the stack is ordered
    assert [s.position[2] for s in ordered(slices) if s.position] == [-50 + 2.5 * i for i in range(40)]


def test_several_slices_are_spread_evenly_through_the_volume() -> None:
    assert evenly_spaced(40, 1) == [20]
    assert evenly_spaced(41, 1) == [20]
    assert evenly_spaced(40, 3) == [6, 20, 33]
    assert evenly_spaced(2, 5) == [0, 1]
    entries = [orthanc_entry(index + 1, [0, 0, float(index)]) for index in range(10)]
    chosen = choose([Slice.from_orthanc(entry) for entry in entries], 2)
    assert [c.instance.instance_number for c in chosen] == [3, 8]
    assert [c.slice_label for c in chosen] == ["slice 3 of 10", "slice 8 of 10"]


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


def test_every_instance_of_a_projection_series_is_sent_up_to_the_images_a_request_holds() -> None:
    entries = [orthanc_entry(number, None) for number in (2, 1)]
    assert [c.instance.instance_id for c in choose([Slice.from_orthanc(e) for e in entries], 8)] == [
        "orthanc-1",
        "orthanc-2",
    ]
    # An ultrasound series of 20 images: 8 of them, spread through it.
    many = [Slice.from_orthanc(orthanc_entry(number, None)) for number in range(1, 21)]
    assert [c.instance.instance_number for c in choose(many, 8)] == [2, 4, 7, 9, 12, 14, 17, 19]


def test_the_series_keeps_its_images_and_the_prior_gets_the_room_left() -> None:
    assert image_counts(5, max_images=8, with_prior=False) == (5, 0)
    assert image_counts(5, max_images=8, with_prior=True) == (5, 3)
    assert image_counts(2, max_images=8, with_prior=True) == (2, 2)
    assert image_counts(8, max_images=8, with_prior=True) == (7, 1)  # a prior keeps one place
    assert image_counts(8, max_images=8, with_prior=False) == (8, 0)


def test_captions_say_where_an_image_lies_or_its_view_and_which_study_it_is() -> None:
    assert caption("slice 21 of 40") == "slice 21 of 40"
    assert caption("slice 21 of 40", "current", "20250312") == "current, 2025-03-12, slice 21 of 40"
    assert caption("PA", "prior", "20240101") == "prior, 2024-01-01, PA"
    assert caption("", "prior", "20240101") == "prior, 2024-01-01"
    assert caption("PA", "prior", "") == "prior, PA"  # an unstated date is left out, not made up
    assert view_label(b"PA") == "PA"
    assert view_label(b"LL ") == "LL"  # padded to an even length, as DICOM stores it
    assert view_label(b"Dr. Who?\0") == ""  # not a View Position: never sent as one
    assert view_label(b"") == ""


def study(study_id: str, patient_id: str, study_date: str, study_time: str = "101500") -> dict[str, Any]:
    """An entry of /tools/find's expanded answer at the study level."""
    return {
        "ID": study_id,
        "MainDicomTags": {"StudyDate": study_date, "StudyTime": study_time},
        "PatientMainDicomTags": {"PatientID": patient_id},
    }


def test_the_prior_is_the_patients_latest_study_dated_before_this_one() -> None:
    query = prior_query("P-1", "20250312", "CT")
    assert query == {
        "Level": "Study",
        "Expand": True,
        "CaseSensitive": True,
        "Query": {"PatientID": "P-1", "StudyDate": "-20250312", "ModalitiesInStudy": "CT"},
    }
    found = [
        study("same-day", "P-1", "20250312"),  # up to the day, as asked: the study itself, or one of its day
        study("older", "P-1", "20230101"),
        study("latest", "P-1", "20240312", "080000"),
        study("latest-earlier-that-day", "P-1", "20240312", "070000"),
        study("another-patient", "P-10", "20241231"),  # a sloppy match is not trusted
        study("undated", "P-1", ""),
    ]
    assert [s["ID"] for s in earlier_studies(found, "P-1", "20250312")] == [
        "latest",
        "latest-earlier-that-day",
        "older",
    ]


@pytest.mark.parametrize(
    ("patient_id", "study_date"),
    [("", "20250312"), ("P*", "20250312"), ("P?1", "20250312"), ("P1\\P2", "20250312"), ("P-1", "")],
)
def test_no_prior_is_looked_for_when_the_patient_or_the_date_cannot_be_told_for_sure(
    patient_id: str, study_date: str
) -> None:
    # /tools/find reads * and ? as wildcards and a backslash as a list: another patient's studies could match.
    assert prior_query(patient_id, study_date, "CR") is None


def series(
    series_id: str, description: str, number: int, instances: int, modality: str = "CT"
) -> dict[str, Any]:
    """An entry of Orthanc's expanded /studies/{id}/series."""
    tags = {"Modality": modality, "SeriesDescription": description, "SeriesNumber": str(number)}
    return {
        "ID": series_id,
        "MainDicomTags": tags,
        "Instances": [f"{series_id}-{i}" for i in range(instances)],
    }


def test_the_prior_series_is_the_same_protocol_else_the_same_number_else_the_largest() -> None:
    current = series("current", "Chest 2.5 mm", 2, 40)
    scout, thin, thick = (
        series("scout", "Scout", 1, 2),
        series("thin", "chest 2.5 MM", 3, 30),
        series("thick", "Chest 5 mm", 2, 20),
    )
    report = series("report", "Dose report", 9, 1, modality="SR")
    assert comparable_series([scout, thick, thin, report], "CT", current) == thin
    assert comparable_series([scout, thick, report], "CT", current) == thick
    assert comparable_series([scout, series("big", "Other", 5, 90)], "CT", current)["ID"] == "big"
    assert comparable_series([report], "CT", current) is None


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
    assert (ct.instances, cr.instances) == (5, None)
    assert (ct.prior, cr.prior) == (False, True)
    assert settings.max_images == 8
    assert [task.name for task in cr.tasks] == ["report", "ground", "ground:gsps"]
    assert [(task.route, task.accept) for task in ct.tasks] == [
        ("report", "application/dicom"),
        ("ground", "application/dicom; object=gsps"),
    ]
    assert settings.queue_file == "/var/lib/orthanc/db/medmo-queue.sqlite"
    assert settings.stable_age_s == 60


def test_a_question_is_sent_in_the_form_of_vqa_which_may_compare_with_a_prior() -> None:
    configuration = shipped_configuration()
    configuration["MedMO"]["Modalities"] = {"DX": {"Tasks": ["vqa:effusion", "ground", "report"]}}
    vqa, ground, report = RouterSettings.from_configuration(configuration).modalities["DX"].tasks
    # A multipart request's fields are the form's only: the service refuses a query string with it.
    assert vqa.url("http://medmo:8000") == "http://medmo:8000/vqa"
    assert vqa.fields == {"question": "Is there a pleural effusion?"}
    assert (report.fields, ground.fields) == ({}, {})
    assert (vqa.compares, report.compares, ground.compares) == (True, True, False)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"Url": "medmo:8000"}, "MedMO.Url"),
        ({"Url": "http://orthanc:secret@medmo:8000"}, "without a login"),
        ({"Modalities": {"CT": {"Tasks": ["reprot"]}}}, "MedMO.Modalities.CT"),
        ({"Modalities": {"CT": {"Tasks": ["vqa:nothing"]}}}, "MedMO.Questions"),
        ({"Modalities": {"SR": {"Tasks": ["report"]}}}, "MedMO.Modalities.SR"),
        ({"Modalities": {"CT": {"Tasks": ["report"], "Instances": 0}}}, "MedMO.Modalities.CT.Instances"),
        ({"Modalities": {"CT": {"Tasks": ["report"], "Instances": 9}}}, "MedMO.Modalities.CT.Instances"),
        ({"Modalities": {"CR": {"Tasks": ["report"], "Prior": "yes"}}}, "MedMO.Modalities.CR.Prior"),
        ({"MaxImages": 1, "Modalities": {"CR": {"Tasks": ["report"], "Prior": True}}}, "MedMO.MaxImages"),
        ({"MaxImages": 0}, "MedMO.MaxImages"),
        ({"MaxImages": 65}, "MedMO.MaxImages"),
        ({"Modalities": {"CT": {"Tasks": ["report", "report"]}}}, "listed twice"),
        ({"Retry": {"MaxAttempts": 0}}, "MedMO.Retry.MaxAttempts"),
        ({"TimeoutSeconds": "300"}, "MedMO.TimeoutSeconds"),
        ({"Modalities": {"CT": {"Tasks": ["report"], "Priority": "asap"}}}, "MedMO.Modalities.CT.Priority"),
    ],
)
def test_a_configuration_that_cannot_route_is_refused_naming_the_setting(
    change: dict[str, Any], named: str
) -> None:
    configuration = shipped_configuration()
    configuration["MedMO"].update(change)
    with pytest.raises(ConfigurationError, match=named.replace(".", r"\.")):
        RouterSettings.from_configuration(configuration)


@pytest.mark.parametrize(
    ("tags", "priority"),
    [
        ({"RequestedProcedurePriority": "STAT"}, "stat"),
        ({"RequestedProcedurePriority": "high "}, "urgent"),
        ({"RequestedProcedurePriority": "MEDIUM"}, "routine"),
        (
            {
                "RequestAttributesSequence": [
                    {"RequestedProcedurePriority": "LOW"},
                    {"RequestedProcedurePriority": "STAT"},
                ]
            },
            "stat",
        ),
        ({"StudyPriorityID": "HIGH"}, "urgent"),
        ({"RequestedProcedurePriority": "ROUTINE", "StudyPriorityID": "HIGH"}, "urgent"),
        ({"RequestedProcedurePriority": "whenever"}, "routine"),
        ({}, "routine"),
    ],
)
def test_the_studys_dicom_priority_is_the_services(tags: dict[str, Any], priority: str) -> None:
    assert study_priority(tags) == priority
