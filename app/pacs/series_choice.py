"""Which instances of a series a series-level request takes, what the prompt calls each, and which earlier
study of the patient is its prior. Pure functions of the PACS's search answers (QIDO-RS results read as
pydicom datasets); `app/pacs/series_pull.py` asks the PACS and calls them.

The rules are the Orthanc router's (docker/orthanc/medmo_routing.py: `ordered`, `evenly_spaced`, `choose`,
`image_counts`, `view_label`, `earlier_studies`, `comparable_series`), so that a series routed by Orthanc
and a series pulled by UID show the model the same images: of a cross-sectional series (CT, MR, PT, NM)
the middle slice by position along the slice normal, or N slices evenly spaced through the volume; of a
projection series (CR, DX, MG, US, ...) every instance, up to the images a request may hold; with a prior,
the series keeps what it asked for but one place, and the prior gets the room left. The router runs in
Orthanc's own interpreter with the standard library only, so it keeps its own copy of these rules;
tests/pacs/test_dicomweb_client.py checks that the two copies choose alike.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal, NamedTuple

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from app.imaging.series import along_normal

# Stacks of slices through one volume: one slice (or a few) stands for the series. Every other modality is
# projection imaging, each instance a view of its own.
CROSS_SECTIONAL = frozenset({"CT", "MR", "PT", "NM"})
# DICOM matching (PS3.4 C.2.2.2): in a search key these match other values, or several.
_MATCHING_CHARACTERS = frozenset("*?\\")
# A View Position (CS: capitals, digits, space, underscore) is a projection image's caption; anything else
# in it is not put in the prompt.
_VIEW_POSITION = re.compile(r"[A-Z0-9 _]{1,16}")

Asked = int | Literal["all"] | None  # a number of instances, every one, or the modality's default


class DatedStudy(NamedTuple):
    study_instance_uid: str
    study_date: date


@dataclass(frozen=True)
class Chosen:
    """An instance chosen to take, and its place in the series' order."""

    header: Dataset
    place: int  # from 1
    of: int  # the instances in that order


def instances_to_take(asked: Asked, modality: str | None, max_images: int) -> int:
    """How many instances to take of a series of `modality`: the number asked for; for all, as many as a
    request may hold; by default the middle slice of a cross-sectional series, every view of another."""
    if isinstance(asked, int):
        return asked
    if asked is None and modality in CROSS_SECTIONAL:
        return 1
    return max_images


def image_counts(wanted: int, max_images: int, with_prior: bool) -> tuple[int, int]:
    """How many images of the series, and at most how many of its prior, one request holds: the series
    keeps what was asked for, leaving the prior at least one place; the prior gets the room left, up to the
    same count."""
    if not with_prior:
        return min(wanted, max_images), 0
    current = min(wanted, max_images - 1)
    return current, min(wanted, max_images - current)


def modality_of(headers: Sequence[Dataset]) -> str | None:
    """The series' modality, as the first of its instances that states one says."""
    return next((modality for header in headers if (modality := _text(header, "Modality"))), None)


def evenly_spaced(total: int, count: int) -> list[int]:
    """Indices of `count` items spread over `total`, each the middle of its share: 1 of 40 is 20."""
    if count >= total:
        return list(range(total))
    return [(2 * i + 1) * total // (2 * count) for i in range(count)]


def choose(headers: Sequence[Dataset], count: int) -> list[Chosen]:
    """`count` instances evenly spaced through the series (every one, when it holds no more), in its order
    (`ordered`): a stack from one end to the other, views by Instance Number."""
    stack = ordered(headers)
    return [Chosen(stack[index], index + 1, len(stack)) for index in evenly_spaced(len(stack), count)]


def ordered(headers: Sequence[Dataset]) -> list[Dataset]:
    """The instances in their order through the volume: along the slice normal when every one states its
    position and orientation, else by Instance Number (which scanners may count either way, or restart).

    A series mixing orientations (a localizer among axial slices) is ordered by its most common
    orientation, and the others are left out: their positions say nothing along that normal.
    """
    by_uid = sorted(headers, key=_uid)  # equal positions (or numbers) in the router's order
    orientations = [_orientation(header) for header in by_uid]
    if by_uid and all(o is not None and _has_position(h) for o, h in zip(orientations, by_uid, strict=True)):
        reference = Counter(orientations).most_common(1)[0][0]
        stack = [header for header, o in zip(by_uid, orientations, strict=True) if o == reference]
        return [stack[index] for index in along_normal(list(range(len(stack))), stack)]
    return sorted(
        by_uid,
        key=lambda header: (
            _integer(header, "InstanceNumber") is None,
            _integer(header, "InstanceNumber") or 0,
        ),
    )


def label(chosen: Chosen, modality: str | None) -> str | None:
    """What the prompt calls an instance: its place through a cross-sectional volume ("slice 21 of 40",
    counted along the normal), else its view ("PA"); None when it states no valid view."""
    if modality in CROSS_SECTIONAL:
        return f"slice {chosen.place} of {chosen.of}"
    view = _text(chosen.header, "ViewPosition")
    return view if view and _VIEW_POSITION.fullmatch(view) else None


def instance_uid(header: Dataset) -> str | None:
    return _text(header, "SOPInstanceUID")


# --- the prior ---------------------------------------------------------------------------------------


def patient_key(study: Dataset) -> tuple[str, str] | None:
    """(Patient ID, Issuer of Patient ID) of a study, when the ID can be searched for exactly: one value,
    without the characters that DICOM matching reads as wildcards or a list (another patient's studies
    could match)."""
    patient_id = _text(study, "PatientID")
    if not patient_id or _MATCHING_CHARACTERS & set(patient_id):
        return None
    return patient_id, _text(study, "IssuerOfPatientID") or ""


def study_date(study: Dataset) -> date | None:
    text = _text(study, "StudyDate")
    try:
        return datetime.strptime(text or "", "%Y%m%d").date()
    except ValueError:
        return None


def earlier_studies(candidates: Sequence[Dataset], current: Dataset, modality: str) -> list[DatedStudy]:
    """Of `candidates` (the PACS's answer to a search by Patient ID and date), the studies that are the same
    patient's (Patient ID and its issuer, exactly), dated before `current`, and hold images of `modality`;
    latest first. The PACS's matching is not trusted alone: a PACS may ignore a key it does not support,
    or match case-insensitively."""
    patient, before = patient_key(current), study_date(current)
    if patient is None or before is None:
        return []
    current_uid = _text(current, "StudyInstanceUID")
    dated = []
    for study in candidates:
        uid, when = _text(study, "StudyInstanceUID"), study_date(study)
        modalities = study.get("ModalitiesInStudy")
        if (
            patient_key(study) != patient
            or uid is None
            or uid == current_uid
            or when is None
            or when >= before
            or (modalities is not None and modality not in _values(modalities))
        ):
            continue
        dated.append((when, _text(study, "StudyTime") or "", uid))
    return [DatedStudy(uid, when) for when, _, uid in sorted(dated, reverse=True)]


def matching_series(candidates: Sequence[Dataset], current: Dataset, modality: str) -> Dataset | None:
    """The series of a prior study to compare with the current one (`current`: one of its instances, as
    its search answered): of the same modality, the one with the same Series Description (the same
    protocol), else the same Series Number, else the one with the most instances (the main acquisition,
    not a scout)."""
    description = (_text(current, "SeriesDescription") or "").casefold()
    number = _integer(current, "SeriesNumber")
    same_modality = [
        series
        for series in candidates
        if _text(series, "SeriesInstanceUID")
        and _text(series, "Modality") in (None, modality)
        and _integer(series, "NumberOfSeriesRelatedInstances") != 0
    ]
    if not same_modality:
        return None
    return max(
        same_modality,
        key=lambda series: (
            bool(description) and (_text(series, "SeriesDescription") or "").casefold() == description,
            number is not None and _integer(series, "SeriesNumber") == number,
            _integer(series, "NumberOfSeriesRelatedInstances") or 0,
        ),
    )


# --- reading search answers --------------------------------------------------------------------------


def _text(header: Dataset, keyword: str) -> str | None:
    """A single-valued attribute as text, stripped; None when absent, empty or multi-valued."""
    value = header.get(keyword)
    if value is None or isinstance(value, MultiValue):
        return None
    return str(value).strip() or None


def _values(value: object) -> list[str]:
    return [str(item).strip() for item in value] if isinstance(value, MultiValue) else [str(value).strip()]


def _uid(header: Dataset) -> str:
    return _text(header, "SOPInstanceUID") or _text(header, "StudyInstanceUID") or ""


def _integer(header: Dataset, keyword: str) -> int | None:
    try:
        return int(str(header.get(keyword)).strip())
    except ValueError:
        return None


def _orientation(header: Dataset) -> tuple[float, ...] | None:
    numbers = _decimals(header, "ImageOrientationPatient", 6)
    return tuple(round(value, 3) for value in numbers) if numbers else None


def _has_position(header: Dataset) -> bool:
    return _decimals(header, "ImagePositionPatient", 3) is not None


def _decimals(header: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(value) for value in header.get(keyword) or ())
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(map(math.isfinite, numbers)) else None
