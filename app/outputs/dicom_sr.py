"""Results as DICOM Comprehensive Structured Reports, built with highdicom, for a PACS to file with the study.

The report belongs to the source's patient and study (highdicom copies both from the source header), sits
in a new series, and names MedMO Serve and the model as its device observer. It is marked preliminary and
unverified: a radiologist has not signed it. Content follows the shape of a Basic Diagnostic Imaging
Report (TID 2000):

    CONTAINER  Diagnostic Imaging Report (18748-4, LN)
      HAS OBS CONTEXT  device observer: uid, name, manufacturer, model (the model id and revision)
      CONTAINS TEXT  Request (121062, DCM)                  /vqa: the question
      CONTAINS TEXT  Indications for Procedure (121109, DCM)  /report: the clinical indication
      CONTAINS CONTAINER  Findings (121070, DCM)
        CONTAINS TEXT  Finding (121071, DCM)            the answer, the findings, or a box's label
          INFERRED FROM SCOORD  Image Region (111030, DCM)   /ground: the box, a closed POLYLINE in
            SELECTED FROM IMAGE  Source image (121324, DCM)  the source's pixel space (column, row)
      CONTAINS CONTAINER  Impressions (121072, DCM)
        CONTAINS TEXT  Impression (121073, DCM)         /report, when the model wrote one
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import dcmwrite
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app import __version__
from app.imaging import DicomSource
from app.schemas import GroundedFinding, Report

DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
SERIES_NUMBER = 9900  # high, so AI results sort after the acquired series in viewers
MANUFACTURER = "MedMO Serve"
UNLABELLED = "Unnamed finding"


@dataclass(frozen=True)
class Author:
    """Who wrote the report: this service running this model."""

    model: str
    revision: str | None

    @property
    def model_name(self) -> str:
        return self.model if self.revision is None else f"{self.model}@{self.revision}"


def vqa_report(source: DicomSource, author: Author, question: str, answer: str) -> bytes:
    findings = _container(codes.DCM.Findings, [_text(codes.DCM.Finding, answer)])
    return _document(source, author, [_text(codes.DCM.Request, question), findings], "VQA")


def radiology_report(source: DicomSource, author: Author, report: Report, indication: str | None) -> bytes:
    items: list[hd.sr.ContentItem] = []
    if indication:
        items.append(_text(codes.DCM.IndicationsForProcedure, indication))
    items.append(_container(codes.DCM.Findings, [_text(codes.DCM.Finding, report.findings or report.text)]))
    if report.impression:
        items.append(_container(codes.DCM.Impressions, [_text(codes.DCM.Impression, report.impression)]))
    return _document(source, author, items, "report")


def grounding_report(
    source: DicomSource, author: Author, findings: Sequence[GroundedFinding], target: str | None
) -> bytes:
    entries = []
    for finding in findings:
        entry = _text(codes.DCM.Finding, finding.label or target or UNLABELLED)
        entry.ContentSequence = hd.sr.ContentSequence([_region(source, finding)])
        entries.append(entry)
    return _document(source, author, [_container(codes.DCM.Findings, entries)], "grounding")


def _region(source: DicomSource, finding: GroundedFinding) -> hd.sr.ScoordContentItem:
    box = finding.box_px
    corners = np.array(
        [
            [box.x_min, box.y_min],
            [box.x_max, box.y_min],
            [box.x_max, box.y_max],
            [box.x_min, box.y_max],
            [box.x_min, box.y_min],
        ],
        dtype=np.float64,
    )
    region = hd.sr.ScoordContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=corners,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
    image = hd.sr.ImageContentItem(
        name=codes.DCM.SourceImage,
        referenced_sop_class_uid=source.sop_class_uid,
        referenced_sop_instance_uid=source.sop_instance_uid,
        referenced_frame_numbers=source.frame if source.frames > 1 else None,
        relationship_type=hd.sr.RelationshipTypeValues.SELECTED_FROM,
    )
    region.ContentSequence = hd.sr.ContentSequence([image])
    return region


def _document(source: DicomSource, author: Author, items: Sequence[hd.sr.ContentItem], task: str) -> bytes:
    root = hd.sr.ContainerContentItem(name=DIAGNOSTIC_IMAGING_REPORT)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same model always gets the same device UID, so a PACS can group its reports.
            uid=generate_uid(entropy_srcs=["medmo-serve", author.model_name]),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=author.model_name[:64],
        ),
    )
    root.ContentSequence = hd.sr.ContentSequence([*observer, *items])
    document = hd.sr.ComprehensiveSR(
        evidence=[source.header],
        content=root,
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"AI {task} by {author.model_name} (unverified)"[:64],
        software_versions=f"medmo-serve {__version__}",
    )
    buffer = io.BytesIO()
    dcmwrite(buffer, document, enforce_file_format=True)
    return buffer.getvalue()


def _text(name: hd.sr.CodedConcept | object, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,  # type: ignore[arg-type]
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _container(name: object, children: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=name,  # type: ignore[arg-type]
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(list(children))
    return container
