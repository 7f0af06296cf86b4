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
        CONTAINS TEXT  Finding (121071, DCM)            the answer, the findings, a box's label, or a label
          INFERRED FROM SCOORD  Image Region (111030, DCM)   /ground: the box, a closed POLYLINE in
            SELECTED FROM IMAGE  Source image (121324, DCM)  the source's pixel space (column, row)
          HAS PROPERTIES NUM  Probability (122157, DCM)     /classify, /vqa with choices: how probable the
                                                            model makes it among those given ({ratio})
      CONTAINS CONTAINER  Impressions (121072, DCM)
        CONTAINS TEXT  Impression (121073, DCM)         /report, when the model wrote one

A report may be about several images: it is filed in the first one's study, and references every image
(those of another study, a prior's, as other evidence); each region names its own image. What a source
must have for a report to be anchored to it is checked before the model runs (check_report_sources), and
refused with the missing attributes named:

- Study Instance UID: the report is filed in the source's study; without it, it would belong nowhere.
- Series and SOP Instance UIDs and a SOP Class UID that names a standard storage class: the report
  references the source image by them.
- a patient module, that is a Patient ID or a Patient's Name element (either may be empty): without
  one the report would belong to no patient.
- nothing else highdicom refuses to copy (a character set DICOM does not define): an empty report is
  built as a trial, since highdicom's checks are many and not public one by one.
- with several images, one patient (Patient ID and its issuer): a report is about one patient.

What may be filled: the Patient and Study attributes that DICOM makes Type 2 (Patient ID, Patient's
Name, Birth Date and Sex, Accession Number, Study ID, Date and Time, Referring Physician) are written
empty when the source lacks them or holds a value DICOM does not allow there (a sex other than M, F
or O, a date that is not a date). Type 2 means "present, and empty when unknown": an empty value says
unknown, and nothing is ever invented.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom._standard_utils import get_sop_class_iod_map
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM, PersonName

from app import __version__
from app.imaging import DicomSource
from app.imaging.fence import raised_by_this_service

DIAGNOSTIC_IMAGING_REPORT = hd.sr.CodedConcept("18748-4", "LN", "Diagnostic Imaging Report")
SERIES_NUMBER = 9900  # high, so AI results sort after the acquired series in viewers
MANUFACTURER = "MedMO Serve"

# Type 1 attributes of the source the report cannot do without, and what each is for.
_REQUIRED_UIDS = {
    "StudyInstanceUID": "Study Instance UID (the study the report is filed in)",
    "SeriesInstanceUID": "Series Instance UID (to reference the source image)",
    "SOPInstanceUID": "SOP Instance UID (to reference the source image)",
    "SOPClassUID": "SOP Class UID (to reference the source image)",
}
_PATIENT_MODULE = ("PatientID", "PatientName")
_PATIENT_SEXES = frozenset({"M", "F", "O"})


class ReportSourceError(ValueError):
    """The source lacks what a Structured Report must be anchored to. The message names what is missing."""


def check_report_sources(sources: Sequence[DicomSource]) -> None:
    """Refuse sources that one Structured Report cannot be anchored to, before any inference is spent: each
    must do alone, and all must be one patient's (the report is filed in the first one's study, and
    references the others, a prior study's included)."""
    for source in sources:
        check_report_source(source)
    check_one_patient(sources)
    if len(sources) > 1:
        _trial(lambda: _document(sources, _TRIAL_AUTHOR, [], "trial"), "a DICOM Structured Report")


def check_one_patient(sources: Sequence[DicomSource]) -> None:
    if len({_patient(source.header) for source in sources}) > 1:
        raise ReportSourceError(
            "the images belong to different patients (Patient ID, Issuer of Patient ID): one report cannot "
            "be about them all"
        )


def _patient(header: Dataset) -> tuple[str, str]:
    return str(header.get("PatientID", "") or "").strip(), str(
        header.get("IssuerOfPatientID", "") or ""
    ).strip()


def check_report_source(source: DicomSource) -> None:
    """Refuse a source that a Structured Report cannot be anchored to, before any inference is spent."""
    header = source.header
    missing = [label for keyword, label in _REQUIRED_UIDS.items() if not _one_string(header.get(keyword))]
    if not any(keyword in header for keyword in _PATIENT_MODULE):
        missing.append("patient module (neither Patient ID nor Patient's Name)")
    if missing:
        raise ReportSourceError(
            "a DICOM Structured Report cannot be anchored to this source: it has no " + "; no ".join(missing)
        )
    # highdicom copies the patient and study modules by the source's IOD, which it looks up by SOP class
    # (a private helper: highdicom has no public way to ask whether it knows a SOP class).
    if str(header.SOPClassUID).strip() not in get_sop_class_iod_map():
        raise ReportSourceError(
            "a DICOM Structured Report cannot reference this source: its SOP Class UID is not a standard "
            "storage class"
        )
    # Whatever else highdicom would refuse in the header (a character set DICOM does not define, say)
    # is found by building an empty report now, a few milliseconds, rather than a full one after the model.
    _trial(lambda: _document([source], _TRIAL_AUTHOR, [], "trial"), "a DICOM Structured Report")


def _trial(build: Callable[[], object], what: str) -> None:
    """Build an empty object to find what highdicom would refuse in the sources' headers."""
    try:
        build()
    except Exception as exc:
        if raised_by_this_service(exc):
            raise
        # highdicom's message may quote the value it refused: patient data, so it is not passed on.
        raise ReportSourceError(
            f"{what} cannot be built from this source: its header holds a value DICOM does not allow there "
            "(the Specific Character Set, or a UID)"
        ) from exc


@dataclass(frozen=True)
class Author:
    """Who wrote the report: this service running this model."""

    model: str
    revision: str | None

    @property
    def model_name(self) -> str:
        return self.model if self.revision is None else f"{self.model}@{self.revision}"


# --- building blocks for the tasks' content (each task declares its own, `app/tasks/`) ---


def text_item(name: hd.sr.CodedConcept | object, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,  # type: ignore[arg-type]
        value=value,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def container_item(name: object, children: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(
        name=name,  # type: ignore[arg-type]
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    if children:  # an empty Content Sequence is not allowed: none at all says "no findings"
        container.ContentSequence = hd.sr.ContentSequence(list(children))
    return container


def boxed_finding(
    source: DicomSource, label: str, corners: tuple[float, float, float, float]
) -> hd.sr.TextContentItem:
    """A finding inferred from a box on the source image: (x_min, y_min, x_max, y_max) in its pixels."""
    entry = text_item(codes.DCM.Finding, label)
    entry.ContentSequence = hd.sr.ContentSequence([_region(source, corners)])
    return entry


# UCUM's unit for a dimensionless ratio: a probability from 0 to 1.
RATIO = hd.sr.CodedConcept("{ratio}", "UCUM", "ratio")


def scored_finding(label: str, probability: float) -> hd.sr.TextContentItem:
    """A finding with its probability among the answers the model chose from (0 to 1)."""
    entry = text_item(codes.DCM.Finding, label)
    score = hd.sr.NumContentItem(
        name=codes.DCM.Probability,
        value=probability,
        unit=RATIO,
        relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
    )
    entry.ContentSequence = hd.sr.ContentSequence([score])
    return entry


def _region(source: DicomSource, corners: tuple[float, float, float, float]) -> hd.sr.ScoordContentItem:
    x_min, y_min, x_max, y_max = corners
    polyline = np.array(
        [[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max], [x_min, y_min]], dtype=np.float64
    )
    region = hd.sr.ScoordContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=polyline,
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


def structured_report(
    sources: Sequence[DicomSource], author: Author, items: Sequence[hd.sr.ContentItem], title: str
) -> bytes:
    """A Comprehensive SR holding `items`, in the first source's patient and study, referencing every
    source as evidence (those of another study, a prior's, as other evidence), as a DICOM Part 10 file."""
    return _document(sources, author, items, title)


def _document(
    sources: Sequence[DicomSource], author: Author, items: Sequence[hd.sr.ContentItem], task: str
) -> bytes:
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
    # Each instance once, though several frames of it may have been sent.
    headers = {source.sop_instance_uid: source.header for source in sources}
    document = hd.sr.ComprehensiveSR(
        evidence=[anchored_header(header) for header in headers.values()],
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


def anchored_header(header: Dataset) -> Dataset:
    """The source header with its Type 2 patient and study attributes present, each valid or empty."""
    # A new dataset sharing the source's elements: the source's FileDataset also holds the whole upload,
    # which a deep copy would duplicate. Elements are replaced here, never changed in place.
    evidence = Dataset()
    for element in header:
        evidence.add(element)
    for keyword, valid in _TYPE_2_CHECKS.items():
        value = evidence.get(keyword)
        if value is None or not valid(value):
            _replace(evidence, keyword, "")
    character_set = evidence.get("SpecificCharacterSet")
    if isinstance(character_set, MultiValue) and character_set and not character_set[0]:
        # PS3.3 C.12.1.1.2: an empty first value of several means ISO 2022 IR 6; highdicom wants it said.
        _replace(evidence, "SpecificCharacterSet", ["ISO 2022 IR 6", *list(character_set)[1:]])
    elif character_set == "":
        del evidence["SpecificCharacterSet"]  # empty: the default repertoire, as if absent
    return evidence


def _replace(evidence: Dataset, keyword: str, value: object) -> None:
    if keyword in evidence:
        del evidence[keyword]  # setting the value would change the element the source shares
    setattr(evidence, keyword, value)


def _one_string(value: object) -> bool:
    # One value read as a string (a UID, a name); a multi-valued element reads as a list.
    return isinstance(value, str) and bool(value.strip())


def _text_value(value: object) -> bool:
    return isinstance(value, str)


def _parses_as(kind: Callable[[str], object]) -> Callable[[object], bool]:
    def valid(value: object) -> bool:
        if not isinstance(value, str):
            return False
        try:
            kind(value)
        except (ValueError, TypeError, OverflowError):
            return False
        return True

    return valid


# What highdicom's report constructor requires of each Type 2 attribute it reads from the source. Person
# names read as PersonName; a multi-valued element reads as a list, and is refused.
_TYPE_2_CHECKS: dict[str, Callable[[object], bool]] = {
    "PatientID": _text_value,
    "PatientName": lambda value: isinstance(value, (str, PersonName)),
    "PatientBirthDate": _parses_as(DA),
    "PatientSex": lambda value: isinstance(value, str) and value in {*_PATIENT_SEXES, ""},
    "AccessionNumber": _text_value,
    "StudyID": _text_value,
    "StudyDate": _parses_as(DA),
    "StudyTime": _parses_as(TM),
    "ReferringPhysicianName": lambda value: isinstance(value, (str, PersonName)),
}
_TRIAL_AUTHOR = Author(model="trial", revision=None)
