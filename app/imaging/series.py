"""The order a request's images are shown in: slices of one series in anatomical order.

Works on DICOM headers, so the same order applies to uploaded images and to a PACS's answers to a
query (QIDO-RS results read as datasets).

A client may send a CT's slices in any order (a PACS lists them by arrival, not by place); the model reads
a stack best from one end to the other. DICOM images of one series are therefore ordered by their position
along the slice normal (Image Position and Orientation (Patient)), as viewers stack them; when any of them
lacks those, or they lie in different orientations, they keep the order they were sent in. Each series (and
each image that is not DICOM) keeps the place where it first appeared, so a current study sent before its
prior stays first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pydicom.dataset import Dataset


def anatomical_order(headers: Sequence[Dataset | None]) -> list[int]:
    """Indexes of the images, given their DICOM headers (None: not DICOM), in the order to show them."""
    order: list[int] = []
    placed: set[int] = set()
    for index, header in enumerate(headers):
        if index in placed:
            continue
        series = _series(header)
        group = [index]
        if series is not None:
            group = along_normal(
                [other for other, candidate in enumerate(headers) if _series(candidate) == series], headers
            )
        order.extend(group)
        placed.update(group)
    return order


def along_normal(group: list[int], headers: Sequence[Dataset | None]) -> list[int]:
    """The images `group` (indexes into `headers`, one series) ordered by position along their common slice
    normal; as given when any lacks its geometry or their orientations differ."""
    geometry = [_geometry(headers[index]) for index in group]
    known = [g for g in geometry if g is not None]
    if len(group) < 2 or len(known) < len(group):
        return group
    orientations = {tuple(round(v, 3) for v in orientation) for _, orientation in known}
    if len(orientations) != 1:
        return group  # a localizer among axial slices, say: no one normal orders them all
    (orientation,) = orientations
    row, column = orientation[:3], orientation[3:]
    normal = (
        row[1] * column[2] - row[2] * column[1],
        row[2] * column[0] - row[0] * column[2],
        row[0] * column[1] - row[1] * column[0],
    )
    distance = {
        index: sum(p * n for p, n in zip(position, normal, strict=True))
        for index, (position, _) in zip(group, known, strict=True)
    }
    return sorted(group, key=lambda index: distance[index])  # stable: equal positions keep their order


def _series(header: Dataset | None) -> str | None:
    if header is None:
        return None
    uid = header.get("SeriesInstanceUID")
    return str(uid) if uid else None


def _geometry(header: Dataset | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(position, orientation) of a single-frame image, or None if it does not state both."""
    if header is None:
        return None
    try:
        position = tuple(float(v) for v in header.get("ImagePositionPatient") or ())
        orientation = tuple(float(v) for v in header.get("ImageOrientationPatient") or ())
    except (TypeError, ValueError):
        return None
    if len(position) != 3 or len(orientation) != 6 or not all(map(math.isfinite, (*position, *orientation))):
        return None
    return position, orientation
