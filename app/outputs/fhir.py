"""Results as a FHIR R4 Bundle, for an EHR: the answer as a preliminary DiagnosticReport with its evidence.

Every resource is built with fhir.resources' R4B models (FHIR 4.3, which left the resources used here
as R4 has them, so R4 servers read them), so each is validated as it is made. The bundle is a
"collection": a set of resources about one answer, linked by urn:uuid: full URLs. It is not a
"transaction" on purpose: a transaction would tell the EHR to create a Patient, and the service cannot
know whether the EHR already holds that patient under another id. The integration engine (Mirth,
Rhapsody, the EHR's own FHIR inbox) matches the Patient by its identifier and files the rest.

    Bundle (collection)
      DiagnosticReport   status preliminary, LOINC 18748-4 "Diagnostic imaging study"
                         conclusion: the impression, else the answer, else the findings (model-written only)
                         presentedForm: every text, region and score as text/plain
                         result -> the Observations, imagingStudy -> the ImagingStudy resources
                         basedOn -> the order, by its accession number (a logical reference: identifier only)
      Observation        one per region: code = the label (and SNOMED CT where the small table below
                         matches), components = the box in the image's pixels, the source image's SOP
                         Instance UID, frame and index in the request; derivedFrom -> its ImagingStudy
      Observation        one per score: code = the label, valueQuantity = the probability (UCUM "1")
      ImagingStudy       one per DICOM study used, by Study Instance UID, with the series and instances sent
      Patient            from the DICOM header, or from the client's SubjectIdentity for other images
      Device             the model and this service
      Provenance         the Device as author of the report and the Observations

R4B lets neither DiagnosticReport.performer nor resultsInterpreter name a Device (only Practitioner,
PractitionerRole, Organization or CareTeam), so the model attaches through Observation.device and
through the Provenance's agent, whose `who` allows a Device.

Nothing about the patient is invented: a Patient carries only what the DICOM header (or the client)
holds; with neither, there is no Patient, no subject and no ImagingStudy (which requires a subject),
and the study is referenced by its identifier alone. The pixel data never enters the bundle.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.attachment import Attachment
from fhir.resources.R4B.bundle import Bundle, BundleEntry
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.humanname import HumanName
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy, ImagingStudySeries, ImagingStudySeriesInstance
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance, ProvenanceAgent, ProvenanceEntity
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM, PersonName

from app.imaging import DicomSource
from app.outputs.dicom_sr import check_one_patient
from app.outputs.results import Algorithm, Region, Results, Score

FHIR_JSON = "application/fhir+json"

LOINC = "http://loinc.org"
SNOMED_CT = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID = "urn:dicom:uid"  # the system FHIR gives DICOM UIDs, written as urn:oid:<uid>
RFC_3986 = "urn:ietf:rfc:3986"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"

DIAGNOSTIC_IMAGING_STUDY = Coding(system=LOINC, code="18748-4", display="Diagnostic imaging study")

# Labels the model writes, as SNOMED CT concepts: exact names only (lower case, single spaces), never a
# guess. Each code was checked against DICOM PS3.16 (as pydicom ships it) or SNOMED CT's own browser
# names. "Lung nodule" is 786838002 "Nodule of lung", not 427359005, which is a *solitary* nodule.
_SNOMED_FINDINGS: dict[str, tuple[str, str]] = {
    "pleural effusion": ("60046008", "Pleural effusion"),
    "pleural effusions": ("60046008", "Pleural effusion"),
    "pneumothorax": ("36118008", "Pneumothorax"),
    "fracture": ("125605004", "Fracture of bone"),
    "fractures": ("125605004", "Fracture of bone"),
    "nodule": ("27925004", "Nodule"),
    "nodules": ("27925004", "Nodule"),
    "lung nodule": ("786838002", "Nodule of lung"),
    "lung nodules": ("786838002", "Nodule of lung"),
    "pulmonary nodule": ("786838002", "Nodule of lung"),
    "pulmonary nodules": ("786838002", "Nodule of lung"),
    "mass": ("4147007", "Mass"),
    "masses": ("4147007", "Mass"),
    "consolidation": ("95436008", "Lung consolidation"),
    "cardiomegaly": ("8186001", "Cardiomegaly"),
    "atelectasis": ("46621007", "Atelectasis"),
}

_TASK_TITLES = {
    "report": "Imaging report",
    "vqa": "Answer to a question about the images",
    "ground": "Findings located on the images",
    "classify": "Findings weighed among the labels given",
}
# Which text is the report's conclusion, in order of preference. Others go only in presentedForm.
_CONCLUSION_HEADINGS = ("Impression", "Answer", "Findings")
_DICOM_SEXES = {"M": "male", "F": "female", "O": "other"}
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # what FHIR's id type and DICOM both accept, up to 64 characters
_TIMEZONE = re.compile(r"([+-])([01][0-9]|2[0-3])([0-5][0-9])")


@dataclass(frozen=True)
class SubjectIdentity:
    """Who and what study an image without a DICOM header belongs to, as the client states it.

    `issuer` is the authority that assigned the patient id: an OID or a URI becomes the identifier's
    system, other text its assigner's name.
    """

    patient_id: str | None = None
    issuer: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None


def fhir_bundle(
    results: Results,
    sources: Sequence[DicomSource | None],
    algorithm: Algorithm,
    *,
    subject: SubjectIdentity | None = None,
    issued: datetime | None = None,
) -> dict[str, Any]:
    """The results as a FHIR R4 collection Bundle, JSON-ready (serialise it with json.dumps and send it
    as `FHIR_JSON`). `sources` holds one entry per image of the request, in order: its DICOM source, or
    None for an image sent as PNG, JPEG or TIFF. `subject` identifies the patient and study of images
    without a header; DICOM headers identify their own, so both at once are refused, as are DICOM
    sources of different patients. `issued` must carry a time zone; it defaults to now."""
    issued = issued or datetime.now(UTC)
    if issued.tzinfo is None:
        raise ValueError("issued must carry a time zone: FHIR instants do")
    for region in results.regions:
        if not 0 <= region.image_index < len(sources):
            raise ValueError(f"a region is on image {region.image_index}, which the request does not have")
    dicom = [source for source in sources if source is not None]
    if dicom and subject is not None:
        raise ValueError("DICOM images identify their own patient and study: a subject is for other images")
    if (
        subject is not None
        and _text(subject.study_instance_uid)
        and not _is_uid(_text(subject.study_instance_uid))
    ):
        raise ValueError("the subject's study_instance_uid is not a DICOM UID (digits and dots, at most 64)")
    check_one_patient(dicom)
    return _BundleBuilder(results, sources, algorithm, subject, issued).build()


class _BundleBuilder:
    """One bundle's resources and the urn:uuid: full URLs they reference each other by."""

    def __init__(
        self,
        results: Results,
        sources: Sequence[DicomSource | None],
        algorithm: Algorithm,
        subject: SubjectIdentity | None,
        issued: datetime,
    ) -> None:
        self.results = results
        self.sources = sources
        self.algorithm = algorithm
        self.issued = issued
        self.entries: list[BundleEntry] = []
        first = next((source for source in sources if source is not None), None)
        self.header = first.header if first is not None else None
        self.subject = subject

    def build(self) -> dict[str, Any]:
        report_url = _urn()
        device = self._add(_device(self.algorithm))
        patient = self._patient()
        patient_ref = self._add(patient) if patient is not None else None
        studies = self._studies(patient_ref)
        effective = _study_time(self.header) if self.header is not None else None
        observations = [
            self._region(region, device, patient_ref, studies, effective) for region in self.results.regions
        ]
        observations += [
            self._score(score, device, patient_ref, list(studies.values()), effective)
            for score in self.results.scores
        ]
        report = DiagnosticReport(
            identifier=[Identifier(system=RFC_3986, value=report_url)],
            basedOn=self._order(),
            status="preliminary",
            code=CodeableConcept(
                coding=[DIAGNOSTIC_IMAGING_STUDY], text=_TASK_TITLES.get(self.results.task, self.results.task)
            ),
            subject=patient_ref,
            effectiveDateTime=effective,
            issued=self.issued,
            result=observations or None,
            imagingStudy=list(studies.values()) or None,
            conclusion=_conclusion(self.results),
            presentedForm=[self._presented_form()],
        )
        # The report leads: a reader of the bundle meets the answer first.
        self.entries.insert(0, BundleEntry(fullUrl=report_url, resource=report))
        self._add(
            Provenance(
                target=[Reference(reference=report_url), *observations],
                recorded=self.issued,
                activity=CodeableConcept(
                    coding=[Coding(system=DATA_OPERATION, code="CREATE", display="create")]
                ),
                agent=[
                    ProvenanceAgent(
                        type=CodeableConcept(
                            coding=[Coding(system=PARTICIPANT_TYPE, code="author", display="Author")]
                        ),
                        who=device,
                    )
                ],
                entity=[ProvenanceEntity(role="source", what=study) for study in studies.values()] or None,
            )
        )
        bundle = Bundle(
            identifier=Identifier(system=RFC_3986, value=_urn()),
            type="collection",
            timestamp=self.issued,
            entry=self.entries,
        )
        return bundle.model_dump(mode="json")

    def _add(self, resource: Resource) -> Reference:
        url = _urn()
        self.entries.append(BundleEntry(fullUrl=url, resource=resource))
        return Reference(reference=url)

    # --- who and what study ---

    def _patient(self) -> Patient | None:
        if self.header is not None:
            return _patient_from_header(self.header)
        if self.subject is not None and _text(self.subject.patient_id):
            identifier = _patient_identifier(_text(self.subject.patient_id), _text(self.subject.issuer))
            return Patient(identifier=[identifier])
        return None

    def _accession_number(self) -> str:
        if self.header is not None:
            return _header_text(self.header, "AccessionNumber")
        return _text(self.subject.accession_number) if self.subject is not None else ""

    def _order(self) -> list[Reference] | None:
        """The order the report answers, by its accession number: the EHR holds the ServiceRequest."""
        accession = self._accession_number()
        if not accession:
            return None
        return [Reference(type="ServiceRequest", identifier=_accession_identifier(accession))]

    def _studies(self, patient: Reference | None) -> dict[str, Reference]:
        """A reference to each study of the request's images, by Study Instance UID, in order.

        An ImagingStudy requires a subject: without a patient, the study is named by its identifier only.
        """
        sources_by_study: dict[str, list[DicomSource]] = {}
        for source in self.sources:
            if source is not None and _is_uid(source.study_instance_uid):
                sources_by_study.setdefault(source.study_instance_uid, []).append(source)
        if (
            not sources_by_study
            and self.subject is not None
            and _is_uid(_text(self.subject.study_instance_uid))
        ):
            study_uid = _text(self.subject.study_instance_uid)
            return {study_uid: Reference(type="ImagingStudy", identifier=_study_identifier(study_uid))}
        if patient is None:
            return {
                uid: Reference(type="ImagingStudy", identifier=_study_identifier(uid))
                for uid in sources_by_study
            }
        return {uid: self._add(_imaging_study(uid, used, patient)) for uid, used in sources_by_study.items()}

    # --- observations ---

    def _region(
        self,
        region: Region,
        device: Reference,
        patient: Reference | None,
        studies: dict[str, Reference],
        effective: str | None,
    ) -> Reference:
        source = self.sources[region.image_index]
        study = studies.get(source.study_instance_uid) if source is not None else None
        x_min, y_min, x_max, y_max = region.box_px
        # x counts columns and y rows, from the top left corner of the image as sent (a DICOM frame's grid).
        components = [
            _pixels("Bounding box x_min (column)", x_min),
            _pixels("Bounding box y_min (row)", y_min),
            _pixels("Bounding box x_max (column)", x_max),
            _pixels("Bounding box y_max (row)", y_max),
            ObservationComponent(
                code=CodeableConcept(text="Image index in the request (from 0)"),
                valueInteger=region.image_index,
            ),
        ]
        if source is not None and _is_uid(source.sop_instance_uid):
            components.append(
                ObservationComponent(
                    code=CodeableConcept(coding=[Coding(system=DCM, code="121324", display="Source image")]),
                    valueString=source.sop_instance_uid,
                )
            )
            if source.frames > 1:
                components.append(
                    ObservationComponent(
                        code=CodeableConcept(
                            coding=[Coding(system=DCM, code="121190", display="Referenced Frames")]
                        ),
                        valueInteger=source.frame,
                    )
                )
        observation = Observation(
            status="preliminary",
            category=[_imaging_category()],
            code=_finding(region.label),
            subject=patient,
            effectiveDateTime=effective,
            issued=self.issued,
            device=device,
            derivedFrom=[study] if study is not None else None,
            component=components,
        )
        return self._add(observation)

    def _score(
        self,
        score: Score,
        device: Reference,
        patient: Reference | None,
        studies: list[Reference],
        effective: str | None,
    ) -> Reference:
        observation = Observation(
            status="preliminary",
            category=[_imaging_category()],
            code=_finding(score.label),
            subject=patient,
            effectiveDateTime=effective,
            issued=self.issued,
            device=device,
            derivedFrom=studies or None,
            valueQuantity=Quantity(value=score.probability, unit="1", system=UCUM, code="1"),
            note=[
                Annotation(
                    text="Probability (0 to 1) the model gives this label among the labels it was given"
                )
            ],
        )
        return self._add(observation)

    def _presented_form(self) -> Attachment:
        text = _report_text(self.results, self.sources, self.algorithm)
        return Attachment(
            contentType="text/plain; charset=utf-8",
            data=base64.b64encode(text.encode("utf-8")).decode("ascii"),
            title=_TASK_TITLES.get(self.results.task, self.results.task),
            creation=self.issued,
        )


# --- resources ---


def _device(algorithm: Algorithm) -> Device:
    model_name = algorithm.model if algorithm.revision is None else f"{algorithm.model}@{algorithm.revision}"
    versions = [DeviceVersion(type=CodeableConcept(text=algorithm.service), value=algorithm.service_version)]
    if algorithm.revision is not None:
        versions.insert(
            0, DeviceVersion(type=CodeableConcept(text="model revision"), value=algorithm.revision)
        )
    return Device(
        # The DICOM Structured Report's device observer UID for the same model (dicom_sr._document), so an
        # EHR and a PACS name the same algorithm the same way.
        identifier=[
            Identifier(
                system=DICOM_UID, value=f"urn:oid:{generate_uid(entropy_srcs=['medmo-serve', model_name])}"
            )
        ],
        manufacturer=algorithm.service,
        deviceName=[DeviceDeviceName(name=algorithm.model, type="model-name")],
        type=CodeableConcept(text="AI algorithm"),
        version=versions,
    )


def _patient_from_header(header: Dataset) -> Patient | None:
    """The patient as the header records them: each attribute only when it holds a valid value."""
    patient_id = _header_text(header, "PatientID")
    identifiers = [_patient_identifier(patient_id, _issuer(header))] if patient_id else None
    name = _human_name(header.get("PatientName"))
    if identifiers is None and name is None:
        return None
    sex = _header_text(header, "PatientSex").upper()
    return Patient(
        identifier=identifiers,
        name=[name] if name is not None else None,
        gender=_DICOM_SEXES.get(sex),
        birthDate=_date(header.get("PatientBirthDate")),
    )


def _issuer(header: Dataset) -> str:
    """The Issuer of Patient ID: its universal id (an OID, URI or UUID) where the header has one."""
    qualifiers = header.get("IssuerOfPatientIDQualifiersSequence")
    if qualifiers:
        universal = _header_text(qualifiers[0], "UniversalEntityID")
        kind = _header_text(qualifiers[0], "UniversalEntityIDType").upper()
        if universal and kind == "UUID":
            return f"urn:uuid:{universal.lower()}"
        if universal and kind in {"ISO", "URI"}:
            return universal
    return _header_text(header, "IssuerOfPatientID")


def _patient_identifier(value: str, issuer: str) -> Identifier:
    if _OID.fullmatch(issuer):
        return Identifier(system=f"urn:oid:{issuer}", value=value)
    if issuer.startswith(("urn:", "http://", "https://")):
        return Identifier(system=issuer, value=value)
    # A local name ("HOSPITAL_A") is not a URI: it names the assigner, and the identifier has no system.
    return Identifier(
        value=value, assigner=Reference(type="Organization", display=issuer) if issuer else None
    )


def _human_name(value: object) -> HumanName | None:
    if not isinstance(value, (str, PersonName)) or not str(value).strip():
        return None
    name = value if isinstance(value, PersonName) else PersonName(value)
    given = [part for part in (name.given_name.strip(), name.middle_name.strip()) if part]
    human = HumanName(
        family=name.family_name.strip() or None,
        given=given or None,
        prefix=[name.name_prefix.strip()] if name.name_prefix.strip() else None,
        suffix=[name.name_suffix.strip()] if name.name_suffix.strip() else None,
    )
    if human.family is None and human.given is None:
        return HumanName(text=str(value).strip())  # ideographic or phonetic groups only: kept as written
    return human


def _imaging_study(study_uid: str, sources: list[DicomSource], patient: Reference) -> ImagingStudy:
    """The study as far as the request used it: its series and instances that were sent, each once."""
    modalities: dict[str, str] = {}
    instances: dict[str, dict[str, str]] = {}  # series UID -> SOP Instance UID -> SOP Class UID
    for source in sources:
        # Modality and SOP Class are required here: a header without them lists no series.
        if _is_uid(source.series_instance_uid) and source.modality and _is_uid(source.sop_class_uid):
            modalities.setdefault(source.series_instance_uid, source.modality)
            if _is_uid(source.sop_instance_uid):
                members = instances.setdefault(source.series_instance_uid, {})
                members.setdefault(source.sop_instance_uid, source.sop_class_uid)
    series = [
        ImagingStudySeries(
            uid=series_uid,
            modality=Coding(system=DCM, code=modalities[series_uid]),
            instance=[
                ImagingStudySeriesInstance(
                    uid=uid, sopClass=Coding(system=RFC_3986, code=f"urn:oid:{sop_class}")
                )
                for uid, sop_class in members.items()
            ],
        )
        for series_uid, members in instances.items()
    ]
    identifiers = [_study_identifier(study_uid)]
    accession = _header_text(sources[0].header, "AccessionNumber")
    if accession:
        identifiers.append(_accession_identifier(accession))
    study_modalities = dict.fromkeys(modalities[series_uid] for series_uid in instances)
    return ImagingStudy(
        identifier=identifiers,
        status="available",
        subject=patient,
        modality=[Coding(system=DCM, code=modality) for modality in study_modalities] or None,
        series=series or None,
    )


# --- small values ---


def _finding(label: str) -> CodeableConcept:
    coded = _SNOMED_FINDINGS.get(" ".join(label.lower().split()))
    coding = [Coding(system=SNOMED_CT, code=coded[0], display=coded[1])] if coded else None
    return CodeableConcept(coding=coding, text=label)


def _pixels(name: str, value: float) -> ObservationComponent:
    # UCUM has no pixel unit; an annotation alone ("{pixel}") is UCUM's way to say "a count of pixels".
    return ObservationComponent(
        code=CodeableConcept(text=name),
        valueQuantity=Quantity(value=value, unit="pixel", system=UCUM, code="{pixel}"),
    )


def _imaging_category() -> CodeableConcept:
    return CodeableConcept(coding=[Coding(system=OBSERVATION_CATEGORY, code="imaging", display="Imaging")])


def _study_identifier(study_uid: str) -> Identifier:
    return Identifier(system=DICOM_UID, value=f"urn:oid:{study_uid}")


def _accession_identifier(accession: str) -> Identifier:
    return Identifier(
        type=CodeableConcept(coding=[Coding(system=IDENTIFIER_TYPE, code="ACSN", display="Accession ID")]),
        value=accession,
    )


def _conclusion(results: Results) -> str | None:
    for heading in _CONCLUSION_HEADINGS:
        texts = [text.strip() for name, text in results.texts if name == heading and text.strip()]
        if texts:
            return "\n\n".join(texts)
    return None


def _report_text(results: Results, sources: Sequence[DicomSource | None], algorithm: Algorithm) -> str:
    """The whole answer as a reader sees it: the texts, then each region and score."""
    parts = [f"{name}:\n{text.strip()}" for name, text in results.texts if text.strip()]
    if results.regions:
        lines = ["Regions (x_min, y_min, x_max, y_max in the image's pixels):"]
        for region in results.regions:
            source = sources[region.image_index]
            where = f"image {region.image_index + 1}"
            if source is not None:
                where += f" (SOP Instance UID {source.sop_instance_uid}, frame {source.frame})"
            box = ", ".join(f"{value:g}" for value in region.box_px)
            lines.append(f"- {region.label}: {where}, box ({box})")
        parts.append("\n".join(lines))
    if results.scores:
        lines = ["Probabilities among the labels given:"]
        lines += [f"- {score.label}: {score.probability:.3f}" for score in results.scores]
        parts.append("\n".join(lines))
    model = algorithm.model if algorithm.revision is None else f"{algorithm.model}@{algorithm.revision}"
    parts.append(
        f"Preliminary: written by {model} ({algorithm.service} {algorithm.service_version}), "
        "not verified by a clinician."
    )
    return "\n\n".join(parts) + "\n"


def _study_time(header: Dataset) -> str | None:
    """When the study was made, as a FHIR dateTime: the Study Date, with the Study Time only where the
    header also says its offset from UTC (FHIR times need a zone, and none is assumed)."""
    day = _date(header.get("StudyDate"))
    if day is None:
        return None
    time_text = _header_text(header, "StudyTime")
    zone = _TIMEZONE.fullmatch(_header_text(header, "TimezoneOffsetFromUTC"))
    if zone is None or len(time_text.split(".")[0]) < 6:  # seconds are needed too
        return day
    try:
        time = TM(time_text)
    except ValueError:
        return day
    sign, hours, minutes = zone.groups()
    return f"{day}T{time.isoformat()}{sign}{hours}:{minutes}"


def _date(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        day = DA(value.strip())
    except ValueError:
        return None
    return day.isoformat() if day is not None else None


def _header_text(header: Dataset, keyword: str) -> str:
    value = header.get(keyword)
    return value.strip() if isinstance(value, str) else ""


def _text(value: str | None) -> str:
    return value.strip() if value else ""


def _is_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"
