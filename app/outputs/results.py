"""A task's answer as results a hospital's standards carry: texts, regions on images, scored labels.

Every task says what its answer is in these terms (`Task.results`), and each standard's writer renders the
same results: a DICOM TID 1500 measurement report (`measurement_report.py`), a FHIR bundle (`fhir.py`).
Nothing here knows about a task, and nothing in a writer knows about a route.
"""

from __future__ import annotations

from dataclasses import dataclass

from app import __version__


@dataclass(frozen=True)
class Region:
    """A finding outlined on one of the request's images."""

    label: str
    image_index: int  # in the request, as sent
    # (x_min, y_min, x_max, y_max) in pixels of that image as uploaded (for DICOM, of its frame's grid).
    box_px: tuple[float, float, float, float]


@dataclass(frozen=True)
class Score:
    """A label the model was asked to weigh, and its probability among the labels given."""

    label: str
    probability: float


@dataclass(frozen=True)
class Results:
    task: str  # the route: vqa, report, ground, classify
    # What the model wrote, under the heading it belongs to: ("Question", ...), ("Answer", ...),
    # ("Findings", ...), ("Impression", ...).
    texts: tuple[tuple[str, str], ...] = ()
    regions: tuple[Region, ...] = ()
    scores: tuple[Score, ...] = ()


@dataclass(frozen=True)
class Algorithm:
    """What produced the results (DICOM TID 4019, FHIR's Device): the model and this service."""

    model: str
    revision: str | None
    service: str = "MedMO Serve"
    service_version: str = __version__
