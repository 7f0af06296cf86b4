"""The FHIR bundle of an answer: valid R4B, faithful to the results, and nothing about the patient invented."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.imagingstudy import ImagingStudy
from fhir.resources.R4B.observation import Observation, ObservationComponent
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.provenance import Provenance
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from pydicom.dataset import Dataset
from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from app.imaging import DicomSource, ImageLimits, decode_image
from app.outputs.dicom_sr import Author, ReportSourceError, structured_report
from app.outputs.fhir import FHIR_JSON, SubjectIdentity, fhir_bundle
from app.outputs.results import Algorithm, Region, Results, Score
from tests.conftest import pydicom_file
from tests.corpus import MIB, part10

# highdicom warns about single-component person names (the Structured Report built for the device UID).
pytestmark = pytest.mark.filterwarnings(
    "ignore:The string .* is unlikely to represent the intended person name"
)

LIMITS = ImageLimits(max_bytes=64 * MIB, max_pixels=50_000_000)
ALGORITHM = Algorithm(model="MBZUAI/MedMO-8B", revision="0123abc")
ISSUED = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
R = TypeVar("R", bound=Resource)
T = TypeVar("T")
CT_STUDY_TIME = "2004-01-19T07:27:30-05:00"  # CT_small: StudyDate, StudyTime and its offset from UTC

REPORT = Results(
    task="report",
    texts=(
        ("Findings", "No focal consolidation. Small left effusion."),
        ("Impression", "Small left effusion."),
    ),
)
VQA = Results(task="vqa", texts=(("Question", "Is there a pneumothorax?"), ("Answer", "No pneumothorax.")))
CLASSIFY = Results(
    task="classify",
    texts=(("Question", "Which finding?"),),
    scores=(Score("Pneumothorax", 0.7), Score("cardiomegaly", 0.2), Score("normal", 0.1)),
)


def source(name: str, frame: int | None = None) -> DicomSource:
    decoded = decode_image(pydicom_file(name), LIMITS, frame=frame)
    assert decoded.dicom is not None
    return decoded.dicom


def with_header(original: DicomSource, change: Any) -> DicomSource:
    """The source with a changed copy of its header: the real header, edited as a modality might write it."""
    header = copy.deepcopy(original.header)
    change(header)
    return dataclasses.replace(original, header=header)


def ct_prior_of_same_patient() -> tuple[DicomSource, DicomSource]:
    """CT_small and MR_small, the MR made a prior study of the CT's patient."""
    ct = source("CT_small.dcm")

    def same_patient(header: Dataset) -> None:
        header.PatientID, header.PatientName = ct.header.PatientID, ct.header.PatientName

    return ct, with_header(source("MR_small.dcm"), same_patient)


class Parsed:
    """The bundle read back as R4B models through its JSON text, with its references resolved."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        text = json.dumps(bundle)
        self.text = text
        self.raw = bundle
        self.bundle = Bundle.model_validate_json(text)
        assert self.bundle.model_dump(mode="json") == bundle  # the round trip loses and adds nothing
        assert self.bundle.type == "collection"
        entries = self.bundle.entry or []
        self.by_url: dict[str, Resource] = {}
        for entry in entries:
            assert entry.fullUrl is not None
            assert entry.resource is not None
            self.by_url[entry.fullUrl] = entry.resource
        assert len(self.by_url) == len(entries), "full URLs are unique"
        assert all(url.startswith("urn:uuid:") for url in self.by_url)
        for resource in self.by_url.values():
            self.check_references(resource)

    def all(self, kind: type[R]) -> list[R]:
        return [resource for resource in self.by_url.values() if isinstance(resource, kind)]

    def one(self, kind: type[R]) -> R:
        (resource,) = self.all(kind)
        return resource

    def resolve(self, reference: Reference) -> Resource:
        assert reference.reference is not None
        return self.by_url[reference.reference]

    def check_references(self, model: FHIRAbstractModel) -> None:
        """Every reference resolves within the bundle (or is logical) to a type R4B allows there.

        fhir.resources checks an element's type but not what a Reference points at; R4B's targets are in
        each field's metadata.
        """
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            allowed = extra.get("enum_reference_types")
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Reference) and isinstance(allowed, list):
                    if item.reference is not None:
                        target = self.resolve(item).get_resource_type()
                    else:  # logical: by identifier, or a name only
                        assert item.identifier is not None or item.display is not None
                        target = item.type or ""
                    assert target in allowed or "Resource" in allowed, f"{name} -> {target}"
                elif isinstance(item, FHIRAbstractModel):
                    self.check_references(item)

    @property
    def report(self) -> DiagnosticReport:
        return self.one(DiagnosticReport)

    def presented_text(self) -> str:
        (form,) = self.report.presentedForm or []
        assert form.contentType == "text/plain; charset=utf-8"
        (raw,) = self.raw["entry"][0]["resource"]["presentedForm"]  # the report leads the bundle
        text = base64.b64decode(raw["data"], validate=True).decode("utf-8")
        assert form.data == text.encode("utf-8")  # as fhir.resources reads it back: decoded
        return text


def checked(results: Results, sources: list[DicomSource | None], **options: Any) -> Parsed:
    parsed = Parsed(fhir_bundle(results, sources, ALGORITHM, issued=ISSUED, **options))
    report = parsed.report
    assert report.status == "preliminary"
    assert [(coding.system, coding.code) for coding in report.code.coding or []] == [
        ("http://loinc.org", "18748-4")
    ]
    assert report.issued == ISSUED
    observations = parsed.all(Observation)
    assert [parsed.resolve(reference) for reference in report.result or []] == observations
    device = parsed.one(Device)
    for observation in observations:
        assert observation.status == "preliminary"
        assert observation.device is not None
        assert parsed.resolve(observation.device) is device
        assert observation.subject == report.subject
    provenance = parsed.one(Provenance)
    assert provenance.recorded == ISSUED
    assert [parsed.resolve(target) for target in provenance.target] == [report, *observations]
    (agent,) = provenance.agent
    assert parsed.resolve(agent.who) is device
    return parsed


def test_a_report_from_a_ct_gives_its_impression_as_conclusion_and_every_text_as_presented_form() -> None:
    ct = source("CT_small.dcm")
    parsed = checked(REPORT, [ct])
    report = parsed.report
    assert report.conclusion == "Small left effusion."
    text = parsed.presented_text()
    assert "No focal consolidation. Small left effusion." in text
    assert "Impression:\nSmall left effusion." in text
    assert not parsed.all(Observation)
    assert parsed.raw["entry"][0]["resource"]["effectiveDateTime"] == CT_STUDY_TIME

    patient = parsed.one(Patient)
    assert report.subject is not None
    assert parsed.resolve(report.subject) is patient
    assert [(identifier.system, identifier.value) for identifier in some(patient.identifier)] == [
        (None, "1CT1")
    ]
    (name,) = some(patient.name)
    assert (name.family, name.given) == ("CompressedSamples", ["CT1"])
    assert patient.gender == "other"  # CT_small's Patient's Sex is O
    assert patient.birthDate is None  # and its Patient's Birth Date is empty

    study = parsed.one(ImagingStudy)
    assert [parsed.resolve(reference) for reference in report.imagingStudy or []] == [study]
    assert study.status == "available"
    assert study.subject is not None
    assert parsed.resolve(study.subject) is patient
    assert [(identifier.system, identifier.value) for identifier in some(study.identifier)] == [
        ("urn:dicom:uid", f"urn:oid:{ct.study_instance_uid}")
    ]
    (series,) = some(study.series)
    assert (series.uid, series.modality.code) == (ct.series_instance_uid, "CT")
    (instance,) = some(series.instance)
    assert (instance.uid, instance.sopClass.code) == (ct.sop_instance_uid, f"urn:oid:{ct.sop_class_uid}")


def test_a_png_answer_without_a_subject_names_no_patient_and_no_study() -> None:
    parsed = checked(VQA, [None])
    report = parsed.report
    assert report.conclusion == "No pneumothorax."
    assert "Question:\nIs there a pneumothorax?" in parsed.presented_text()
    assert not parsed.all(Patient)
    assert not parsed.all(ImagingStudy)
    assert report.subject is None
    assert report.imagingStudy is None
    assert report.basedOn is None
    assert report.effectiveDateTime is None  # a PNG says nothing of when it was made
    assert '"subject"' not in parsed.text


@pytest.mark.parametrize(
    ("issuer", "system", "assigner"),
    [
        ("1.2.840.113619.6.1", "urn:oid:1.2.840.113619.6.1", None),
        ("https://hospital.example/mrn", "https://hospital.example/mrn", None),
        ("HOSPITAL_A", None, "HOSPITAL_A"),  # a local name is not a URI: it names the assigner
        (None, None, None),
    ],
)
def test_a_png_answer_belongs_to_the_subject_the_client_names(
    issuer: str | None, system: str | None, assigner: str | None
) -> None:
    subject = SubjectIdentity(
        patient_id="MRN-0042", issuer=issuer, accession_number="ACC-77", study_instance_uid="1.2.3.4.5"
    )
    parsed = checked(VQA, [None], subject=subject)
    patient = parsed.one(Patient)
    (identifier,) = some(patient.identifier)
    assert (identifier.value, identifier.system) == ("MRN-0042", system)
    assert (identifier.assigner.display if identifier.assigner else None) == assigner
    # Only the identifier: the client said nothing else about the patient.
    assert patient.model_dump(exclude_none=True).keys() == {"resourceType", "identifier"}

    report = parsed.report
    assert report.subject is not None
    assert parsed.resolve(report.subject) is patient
    (order,) = report.basedOn or []
    assert order.type == "ServiceRequest"
    assert order.identifier is not None
    assert is_accession(order.identifier, "ACC-77")
    # The study is named by its UID; an ImagingStudy is for studies whose DICOM the service read.
    assert not parsed.all(ImagingStudy)
    (study,) = report.imagingStudy or []
    assert study.type == "ImagingStudy"
    assert study.identifier is not None
    assert (study.identifier.system, study.identifier.value) == ("urn:dicom:uid", "urn:oid:1.2.3.4.5")


def test_a_subject_without_a_patient_id_gives_no_patient() -> None:
    parsed = checked(VQA, [None], subject=SubjectIdentity(accession_number="ACC-77"))
    assert not parsed.all(Patient)
    assert parsed.report.subject is None
    assert parsed.report.basedOn is not None


def test_grounded_regions_on_two_dicom_images_are_observations_of_their_own_images_and_studies() -> None:
    ct, mr = ct_prior_of_same_patient()
    boxes = {
        "Pleural  Effusion": (10.0, 20.5, 60.0, 90.25),
        "nodule": (3.0, 4.0, 30.0, 40.0),
        "Enlarged thingamajig": (1.0, 1.0, 8.0, 9.0),
    }
    results = Results(
        task="ground",
        regions=(
            Region("Pleural  Effusion", 0, boxes["Pleural  Effusion"]),
            Region("nodule", 1, boxes["nodule"]),
            Region("Enlarged thingamajig", 1, boxes["Enlarged thingamajig"]),
        ),
    )
    parsed = checked(results, [ct, mr])
    report = parsed.report
    assert report.conclusion is None  # nothing the model wrote as text: the regions speak for themselves
    text = parsed.presented_text()
    assert "- Pleural  Effusion: image 1" in text
    assert "box (10, 20.5, 60, 90.25)" in text
    assert f"- nodule: image 2 (SOP Instance UID {mr.sop_instance_uid}, frame 1)" in text

    studies = parsed.all(ImagingStudy)
    assert [parsed.resolve(reference) for reference in report.imagingStudy or []] == studies
    study_of = {some(study.identifier)[0].value: study for study in studies}
    assert set(study_of) == {f"urn:oid:{ct.study_instance_uid}", f"urn:oid:{mr.study_instance_uid}"}
    assert len({id(parsed.resolve(study.subject)) for study in studies}) == 1  # one patient, both studies

    observations = parsed.all(Observation)
    assert [observation.code.text for observation in observations] == list(boxes)
    snomed = [[(c.system, c.code) for c in observation.code.coding or []] for observation in observations]
    assert snomed == [[("http://snomed.info/sct", "60046008")], [("http://snomed.info/sct", "27925004")], []]
    for observation, region in zip(observations, results.regions, strict=True):
        image = [ct, mr][region.image_index]
        assert box_of(observation) == region.box_px
        assert (
            component(observation, "Image index in the request (from 0)").valueInteger == region.image_index
        )
        assert component(observation, "121324").valueString == image.sop_instance_uid
        assert not [
            item for item in some(observation.component) if item.code.text == "121190"
        ]  # one frame only
        (derived,) = some(observation.derivedFrom)
        assert parsed.resolve(derived) is study_of[f"urn:oid:{image.study_instance_uid}"]
        assert [some(category.coding)[0].code for category in some(observation.category)] == ["imaging"]

    provenance = parsed.one(Provenance)
    assert [parsed.resolve(entity.what) for entity in some(provenance.entity)] == studies
    assert {entity.role for entity in some(provenance.entity)} == {"source"}


def test_a_region_on_a_frame_of_a_multiframe_image_names_the_frame() -> None:
    dataset = pydicom.dcmread(pydicom_file_path("CT_small.dcm"))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = (
        MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    )
    dataset.NumberOfFrames = 3
    dataset.PixelData = dataset.PixelData * 3
    decoded = decode_image(part10(dataset), LIMITS, frame=2)
    assert decoded.dicom is not None
    results = Results(task="ground", regions=(Region("mass", 0, (1.0, 2.0, 3.0, 4.0)),))
    observation = checked(results, [decoded.dicom]).one(Observation)
    assert component(observation, "121190").valueInteger == 2
    assert [(c.system, c.code) for c in some(observation.code.coding)] == [
        ("http://snomed.info/sct", "4147007")
    ]


def test_a_region_on_a_png_has_its_box_and_image_index_but_no_study() -> None:
    results = Results(task="ground", regions=(Region("Fractures", 1, (156.0, 516.0, 231.0, 607.0)),))
    parsed = checked(results, [None, None])
    observation = parsed.one(Observation)
    assert box_of(observation) == (156.0, 516.0, 231.0, 607.0)
    assert component(observation, "Image index in the request (from 0)").valueInteger == 1
    assert observation.derivedFrom is None
    assert [(c.system, c.code) for c in some(observation.code.coding)] == [
        ("http://snomed.info/sct", "125605004")
    ]
    assert not [item for item in some(observation.component) if item.code.coding]  # no DICOM image to name


def test_scores_are_observations_of_their_probabilities() -> None:
    ct = source("CT_small.dcm")
    parsed = checked(CLASSIFY, [ct])
    observations = parsed.all(Observation)
    assert [(o.code.text, float(some(some(o.valueQuantity).value))) for o in observations] == [
        (score.label, score.probability) for score in CLASSIFY.scores
    ]
    for observation in observations:
        quantity = observation.valueQuantity
        assert (some(quantity).system, some(quantity).code) == ("http://unitsofmeasure.org", "1")
        assert [parsed.resolve(reference) for reference in some(observation.derivedFrom)] == [
            parsed.one(ImagingStudy)
        ]
    codes = [[coding.code for coding in o.code.coding or []] for o in observations]
    assert codes == [["36118008"], ["8186001"], []]  # "normal" is no finding the table knows
    assert parsed.report.conclusion is None  # a question is not a conclusion
    assert "- Pneumothorax: 0.700" in parsed.presented_text()


@pytest.mark.parametrize(
    ("birth_date", "sex", "expected_birth_date", "expected_gender"),
    [
        ("19700102", "F", "1970-01-02", "female"),
        ("19700102", "M", "1970-01-02", "male"),
        (None, None, None, None),  # absent from the header
        ("", "", None, None),  # present and empty: unknown
        ("1970", "X", None, None),  # values DICOM does not allow there
    ],
)
def test_the_patient_holds_only_what_the_header_holds(
    birth_date: str | None, sex: str | None, expected_birth_date: str | None, expected_gender: str | None
) -> None:
    def edit(header: Dataset) -> None:
        for keyword, value in (("PatientBirthDate", birth_date), ("PatientSex", sex)):
            if value is None:
                delattr(header, keyword)
            else:
                setattr(header, keyword, value)

    ct = with_header(source("CT_small.dcm"), edit)
    patient = checked(VQA, [ct]).one(Patient)
    assert (
        patient.birthDate is None
        if expected_birth_date is None
        else str(patient.birthDate) == expected_birth_date
    )
    assert patient.gender == expected_gender
    if expected_gender is None:
        assert "gender" not in patient.model_dump(exclude_none=True)
        assert "birthDate" not in patient.model_dump(exclude_none=True)


def test_the_issuer_and_accession_number_of_the_header_are_kept() -> None:
    def edit(header: Dataset) -> None:
        header.IssuerOfPatientID = "HOSPITAL_A"
        header.AccessionNumber = "A-2004-0119"

    ct = with_header(source("CT_small.dcm"), edit)
    parsed = checked(REPORT, [ct])
    (identifier,) = parsed.one(Patient).identifier or []
    assert (identifier.value, identifier.system, some(identifier.assigner).display) == (
        "1CT1",
        None,
        "HOSPITAL_A",
    )
    (order,) = parsed.report.basedOn or []
    assert order.identifier is not None
    assert is_accession(order.identifier, "A-2004-0119")
    assert any(is_accession(item, "A-2004-0119") for item in some(parsed.one(ImagingStudy).identifier))


def test_a_universal_issuer_becomes_the_identifiers_system() -> None:
    def edit(header: Dataset) -> None:
        qualifier = Dataset()
        qualifier.UniversalEntityID = "2.16.840.1.113883.19.5"
        qualifier.UniversalEntityIDType = "ISO"
        header.IssuerOfPatientIDQualifiersSequence = [qualifier]

    (identifier,) = checked(VQA, [with_header(source("CT_small.dcm"), edit)]).one(Patient).identifier or []
    assert (identifier.system, identifier.value) == ("urn:oid:2.16.840.1.113883.19.5", "1CT1")


def test_a_header_without_a_patient_gives_no_patient_and_names_the_study_by_uid() -> None:
    def edit(header: Dataset) -> None:
        del header.PatientID, header.PatientName

    ct = with_header(source("CT_small.dcm"), edit)
    parsed = checked(VQA, [ct])
    assert not parsed.all(Patient)
    assert not parsed.all(ImagingStudy)  # R4B's ImagingStudy requires a subject
    (study,) = parsed.report.imagingStudy or []
    assert study.identifier is not None
    assert study.identifier.value == f"urn:oid:{ct.study_instance_uid}"


def test_the_device_is_the_model_and_the_service_with_the_structured_reports_device_uid() -> None:
    ct = source("CT_small.dcm")
    device = checked(VQA, [ct]).one(Device)
    assert [(name.name, name.type) for name in some(device.deviceName)] == [("MBZUAI/MedMO-8B", "model-name")]
    assert some(device.type).text == "AI algorithm"
    assert [(some(version.type).text, version.value) for version in some(device.version)] == [
        ("model revision", "0123abc"),
        (ALGORITHM.service, ALGORITHM.service_version),
    ]
    sr = pydicom.dcmread(
        io.BytesIO(structured_report([ct], Author(ALGORITHM.model, ALGORITHM.revision), [], "t"))
    )
    (observer_uid,) = [
        item.UID for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121012"
    ]
    assert [(identifier.system, identifier.value) for identifier in some(device.identifier)] == [
        ("urn:dicom:uid", f"urn:oid:{observer_uid}")
    ]


def test_the_bundle_never_carries_the_pixel_data() -> None:
    # The whole file, pixels included, as the header: the bundle must take attributes, never the dataset.
    dataset = pydicom.dcmread(pydicom_file_path("CT_small.dcm"))
    pixels = base64.b64encode(dataset.PixelData).decode("ascii")
    ct = dataclasses.replace(source("CT_small.dcm"), header=dataset)
    results = Results(task="ground", texts=VQA.texts, regions=(Region("mass", 0, (1.0, 2.0, 3.0, 4.0)),))
    text = checked(results, [ct]).text
    for offset in range(0, len(pixels) - 64, len(pixels) // 16):
        assert pixels[offset : offset + 64] not in text
    assert "7FE00010" not in text.upper()
    assert "PixelData" not in text
    assert text.count('"data"') == 1  # the one attachment: the report's text


def test_what_cannot_be_one_bundle_is_refused() -> None:
    ct, mr = source("CT_small.dcm"), source("MR_small.dcm")
    with pytest.raises(ReportSourceError, match="different patients"):
        fhir_bundle(VQA, [ct, mr], ALGORITHM)
    with pytest.raises(ValueError, match="identify their own patient"):
        fhir_bundle(VQA, [ct], ALGORITHM, subject=SubjectIdentity(patient_id="other"))
    with pytest.raises(ValueError, match="not a DICOM UID"):
        fhir_bundle(VQA, [None], ALGORITHM, subject=SubjectIdentity(study_instance_uid="1.2.x"))
    with pytest.raises(ValueError, match="time zone"):
        fhir_bundle(VQA, [ct], ALGORITHM, issued=datetime(2026, 1, 1))  # naive: no time zone
    with pytest.raises(ValueError, match="image 2"):
        fhir_bundle(
            Results(task="ground", regions=(Region("mass", 2, (1.0, 1.0, 2.0, 2.0)),)), [ct], ALGORITHM
        )


def test_issued_defaults_to_now_and_the_media_type_is_fhir_json() -> None:
    before = datetime.now(UTC)
    bundle = Parsed(fhir_bundle(VQA, [None], ALGORITHM)).bundle
    assert bundle.timestamp is not None
    assert before <= bundle.timestamp <= datetime.now(UTC)
    assert FHIR_JSON == "application/fhir+json"


# --- helpers ---


def some(value: T | None) -> T:
    """An element the bundle must hold."""
    assert value is not None
    return value


def pydicom_file_path(name: str) -> io.BytesIO:
    return io.BytesIO(pydicom_file(name))


def is_accession(identifier: Identifier, value: str) -> bool:
    codes = [
        (coding.system, coding.code) for coding in (identifier.type.coding or [] if identifier.type else [])
    ]
    return identifier.value == value and codes == [("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN")]


def component(observation: Observation, code: str) -> ObservationComponent:
    """The component named by a DICOM code or by its text."""
    (found,) = [
        item
        for item in observation.component or []
        if item.code.text == code or any(coding.code == code for coding in item.code.coding or [])
    ]
    return found


def box_of(observation: Observation) -> tuple[float, ...]:
    names = ("x_min (column)", "y_min (row)", "x_max (column)", "y_max (row)")
    values = []
    for name in names:
        quantity = component(observation, f"Bounding box {name}").valueQuantity
        assert (some(quantity).unit, some(quantity).system, some(quantity).code) == (
            "pixel",
            "http://unitsofmeasure.org",
            "{pixel}",
        )
        values.append(float(some(some(quantity).value)))
    return tuple(values)
