"""Results as a DICOM Measurement Report (TID 1500) in a Comprehensive 3D SR: what IHE AI Results consumers read.

The report is anchored the way the TID 2000 report is (`dicom_sr.py`): filed in the first source's patient and
study (highdicom copies both from the header, its Type 2 attributes present, each valid or empty), in a new
series, referencing every source (a prior study's as other evidence), preliminary and unverified: a
radiologist has not signed it. Its content follows TID 1500, built with highdicom's templates:

    CONTAINER  Imaging Measurement Report (126000, DCM)                 TID 1500
      HAS OBS CONTEXT  device observer (TID 1004): uid, name and manufacturer (MedMO Serve), model name
      HAS CONCEPT MOD CODE  Procedure reported (121058, DCM) = Imaging procedure (363679005, SCT)
      CONTAINS CONTAINER  Image Library (111028, DCM)                   TID 1600: every source instance
      CONTAINS CONTAINER  Imaging Measurements (126010, DCM)            when there are regions or scores
        CONTAINS CONTAINER  Measurement Group (125007, DCM)             TID 1410, one per region
          HAS OBS CONTEXT  Tracking Identifier "finding 1", Tracking Unique Identifier (a fresh UID)
          CONTAINS CODE  Finding (121071, DCM) = the label's code      when FINDING_CODES knows the label
          HAS CONCEPT MOD TEXT  Algorithm Name, Algorithm Version  TID 4019: the model and its revision
          CONTAINS SCOORD  Image Region (111030, DCM)                   the box, a closed POLYLINE in pixels
            SELECTED FROM IMAGE                                         of its source (and frame)
          CONTAINS TEXT  Finding (121071, DCM) = the label, as the model wrote it
        CONTAINS CONTAINER  Measurement Group (125007, DCM)             TID 1501, one per score
          ...tracking, coded finding, algorithm, source images as above
          CONTAINS NUM  Probability (122157, DCM), {ratio}              TID 300
          CONTAINS TEXT  Finding (121071, DCM) = the label
      CONTAINS CONTAINER  Qualitative Evaluations (C0034375, UMLS)     TID 1500 rows 12 and 14: the texts
        CONTAINS TEXT  Request (121062, DCM) / Finding / Findings / Impression / Indications / Comment

Free text in TID 1500: the measurement groups take a qualitative evaluation in text form (TID 1410 row 17,
TID 1501 row 12), and the report one about its whole subject (rows 12 to 14): the labels and the model's
texts go there. highdicom builds only the coded form (`QualitativeEvaluation`), so the text items are
highdicom `TextContentItem`s added to its containers. highdicom's `MeasurementReport` constructor also
requires at least one measurement group, while TID 1500 is satisfied by the qualitative evaluations alone
(a /vqa or /report answer has no region or score): the root is therefore assembled here, row by row, from
highdicom's templates, and read back with `MeasurementReport.from_sequence`, which checks it is TID 1500.

Labels are coded only when they name a finding exactly (ignoring case and spacing) in FINDING_CODES, a small
table of SNOMED CT and DICOM codes that pydicom's code dictionary holds; the label's words are always kept
as text. Fracture, consolidation, atelectasis, emphysema and pneumonia are not in pydicom's dictionary, so
they stay text rather than carry a code typed in here unchecked.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.sr.templates import Template
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from app.imaging import DicomSource
from app.imaging.fence import raised_by_this_service
from app.outputs.dicom_sr import (
    MANUFACTURER,
    RATIO,
    Author,
    ReportSourceError,
    anchored_header,
    check_report_sources,
)
from app.outputs.results import Algorithm, Region, Results, Score

SERIES_NUMBER = 9902  # beside the TID 2000 reports' 9900 and the presentation states' 9901
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
NOTHING_REPORTED = "The model reported no finding."

# Labels the model writes for common findings, and their codes (all from pydicom's code dictionary).
FINDING_CODES: dict[str, Code] = {
    "nodule": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,
    "lesion": codes.SCT.Lesion,
    "cyst": codes.SCT.Cyst,
    "effusion": codes.SCT.Effusion,
    "pleural effusion": codes.SCT.PleuralEffusion,
    "pericardial effusion": codes.SCT.PericardialEffusion,
    "pneumothorax": codes.SCT.Pneumothorax,
    "cardiomegaly": codes.SCT.Cardiomegaly,
    "edema": codes.SCT.Edema,
    "oedema": codes.SCT.Edema,
    "pulmonary edema": codes.SCT.PulmonaryEdema,
    "pulmonary oedema": codes.SCT.PulmonaryEdema,
    "fibrosis": codes.SCT.Fibrosis,
    "hemorrhage": codes.SCT.Hemorrhage,
    "haemorrhage": codes.SCT.Hemorrhage,
    "lymphadenopathy": codes.SCT.Lymphadenopathy,
    "opacity": codes.DCM.Opacity,
    "infiltrate": codes.DCM.Infiltrate,
}

# Results.texts' headings and the concept each is written under.
_TEXT_CONCEPTS: dict[str, Code] = {
    "question": codes.DCM.Request,
    "answer": codes.DCM.Finding,
    "finding": codes.DCM.Finding,
    "findings": codes.DCM.Findings,
    "impression": codes.DCM.Impression,
    "indication": codes.DCM.IndicationsForProcedure,
}


def finding_code(label: str) -> Code | None:
    """The code for a label that names one of FINDING_CODES' findings, else None."""
    return FINDING_CODES.get(" ".join(label.split()).casefold())


def check_measurement_sources(sources: Sequence[DicomSource]) -> None:
    """Refuse, before any inference, sources that a measurement report cannot be anchored to: those the TID
    2000 report refuses (dicom_sr.check_report_sources), and any whose image library entry highdicom
    cannot write."""
    check_report_sources(sources)
    # An empty report built as a trial, as dicom_sr does: highdicom's checks are many and not public.
    try:
        measurement_report(sources, Results(task="trial"), _TRIAL_ALGORITHM, title="trial")
    except Exception as exc:
        if raised_by_this_service(exc):
            raise
        # highdicom's message may quote the value it refused: patient data, so it is not passed on.
        raise ReportSourceError(
            "a DICOM Measurement Report cannot be built from this source: its header holds a value DICOM "
            "does not allow there"
        ) from exc


def measurement_report(
    sources: Sequence[DicomSource], results: Results, algorithm: Algorithm, *, title: str
) -> bytes:
    """The results as a TID 1500 Measurement Report in the first source's patient and study, referencing
    every source, as a DICOM Part 10 file. Regions index `sources` (the request's images, as sent)."""
    report = hd.sr.MeasurementReport.from_sequence([_root(sources, results, algorithm)])
    # Each instance once, though several frames of it may have been sent.
    headers = {source.sop_instance_uid: source.header for source in sources}
    model_name = Author(algorithm.model, algorithm.revision).model_name
    document = hd.sr.Comprehensive3DSR(
        evidence=[anchored_header(header) for header in headers.values()],
        content=report[0],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=algorithm.service,
        manufacturer_model_name=algorithm.model[:64],
        software_versions=[f"{algorithm.service} {algorithm.service_version}"[:64], model_name[:64]],
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=f"AI {title} by {model_name} (unverified)"[:64],
    )
    buffer = io.BytesIO()
    dcmwrite(buffer, document, enforce_file_format=True)
    return buffer.getvalue()


def _root(
    sources: Sequence[DicomSource], results: Results, algorithm: Algorithm
) -> hd.sr.ContainerContentItem:
    """TID 1500's rows in order: observer, procedure, image library, measurements, qualitative evaluations."""
    root = hd.sr.ContainerContentItem(name=codes.DCM.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence(
        [
            *hd.sr.ObservationContext(observer_device_context=_observer(algorithm)),
            hd.sr.CodeContentItem(
                name=codes.DCM.ProcedureReported,
                value=codes.SCT.ImagingProcedure,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
            *hd.sr.ImageLibrary([_library_entry(header) for header in _instances(sources)]),
        ]
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.model[:64], version=(algorithm.revision or "unspecified")[:64]
    )
    groups: list[Template] = [
        _region_group(n, region, sources, algorithm_id) for n, region in enumerate(results.regions, 1)
    ]
    groups += [
        _score_group(n, score, sources, algorithm_id)
        for n, score in enumerate(results.scores, len(results.regions) + 1)
    ]
    if groups:
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence([item for group in groups for item in group])
        content.append(measurements)
    texts = [_text(heading, text) for heading, text in results.texts if text.strip()]
    if texts or not groups:
        # TID 1500 needs measurements or qualitative evaluations: with neither, it says nothing was found.
        evaluations = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        evaluations.ContentSequence = hd.sr.ContentSequence(
            texts or [_text_item(codes.DCM.Finding, NOTHING_REPORTED)]
        )
        content.append(evaluations)
    root.ContentSequence = content
    return root


def _observer(algorithm: Algorithm) -> hd.sr.ObserverContext:
    model_name = Author(algorithm.model, algorithm.revision).model_name
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # The same device UID as the TID 2000 report's for the same model: a PACS groups them.
            uid=generate_uid(entropy_srcs=["medmo-serve", model_name]),
            name=algorithm.service[:64],
            manufacturer_name=MANUFACTURER,
            model_name=model_name[:64],
        ),
    )


def _tracking(number: int) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"finding {number}")


def _region_group(
    number: int, region: Region, sources: Sequence[DicomSource], algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    source = sources[region.image_index]
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(number),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=_rectangle(region.box_px),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
                referenced_frame_numbers=[source.frame] if source.frames > 1 else None,
            ),
        ),
        finding_type=finding_code(region.label),
        algorithm_id=algorithm_id,
    )
    group[0].ContentSequence.append(_text_item(codes.DCM.Finding, region.label))
    return group


def _score_group(
    number: int, score: Score, sources: Sequence[DicomSource], algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A label the model weighed over all the request's images, with its probability among those given."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(number),
        finding_type=finding_code(score.label),
        algorithm_id=algorithm_id,
        measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=score.probability, unit=RATIO)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=source.sop_class_uid,
                referenced_sop_instance_uid=source.sop_instance_uid,
                referenced_frame_numbers=[source.frame] if source.frames > 1 else None,
            )
            for source in sources
        ],
    )
    group[0].ContentSequence.append(_text_item(codes.DCM.Finding, score.label))
    return group


def _text(heading: str, text: str) -> hd.sr.TextContentItem:
    concept = _TEXT_CONCEPTS.get(heading.strip().casefold())
    if concept is None:  # a heading with no concept of its own: a comment that names it
        return _text_item(codes.DCM.Comment, f"{heading}: {text}")
    return _text_item(concept, text)


def _text_item(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _rectangle(box: tuple[float, float, float, float]) -> np.ndarray:
    """The box as a closed POLYLINE: (column, row) corners in the image's pixels, the first repeated."""
    x_min, y_min, x_max, y_max = box
    return np.array(
        [[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max], [x_min, y_min]], dtype=np.float64
    )


def _instances(sources: Sequence[DicomSource]) -> list[Dataset]:
    return list({source.sop_instance_uid: source.header for source in sources}.values())


# What highdicom's image library entry (TID 1602) reads from a header beyond its identity and size, for the
# modalities it describes further: cross-sectional images' geometry, projection radiographs' orientation.
_CROSS_SECTIONAL = {"CT", "MR", "PT"}
_CROSS_SECTIONAL_GEOMETRY = {
    "PixelSpacing": 2,
    "ImageOrientationPatient": 6,
    "ImagePositionPatient": 3,
    "SliceThickness": 1,
}
_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}
_PROJECTION_GEOMETRY = {"PatientOrientation": 2, "ImagerPixelSpacing": 2}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _library_entry(header: Dataset) -> Dataset:
    """What highdicom's image library reads of the header: its identity and size, and the geometry of its
    modality when the header holds all of it, at the top level (an enhanced multi-frame image keeps it in
    its functional groups, which highdicom does not read). Without it, the entry names the image only."""
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
        entry.add(header[keyword])
    frame_of_reference = header.get("FrameOfReferenceUID")
    if isinstance(frame_of_reference, str) and _UID.match(frame_of_reference):
        entry.FrameOfReferenceUID = frame_of_reference
    modality = str(header.get("Modality") or "")
    geometry = (
        _CROSS_SECTIONAL_GEOMETRY
        if modality in _CROSS_SECTIONAL
        else _PROJECTION_GEOMETRY
        if modality in _PROJECTION
        else {}
    )
    if geometry and all(_has_values(header, keyword, count) for keyword, count in geometry.items()):
        for keyword in geometry:
            entry.add(header[keyword])
        entry.Modality = modality
    else:
        entry.Modality = ""  # highdicom describes the geometry of the modalities it knows: none here
    return entry


def _has_values(header: Dataset, keyword: str, count: int) -> bool:
    value = header.get(keyword)
    if value is None:
        return False
    values = list(value) if count > 1 and not isinstance(value, str) else [value]
    if len(values) != count:
        return False
    if keyword == "PatientOrientation":
        return all(isinstance(value, str) and value.strip() for value in values)
    try:
        return all(np.isfinite(float(value)) for value in values)
    except (TypeError, ValueError):
        return False


_TRIAL_ALGORITHM = Algorithm(model="trial", revision=None)
