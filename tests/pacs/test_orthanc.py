"""PACS autorouting end to end: a real Orthanc, configured by docker/orthanc/, and MedMO Serve as a process.

An image stored in Orthanc reaches the service through docker/orthanc/autoroute.lua, and the Structured
Reports the service answers come back into the image's study, where a viewer or the RIS finds them.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bench.servers import RunningServer, free_port, serve
from tests.pacs.orthanc import RunningOrthanc, orthanc, orthanc_binary

# Not skipped when Orthanc is missing: .ci/setup installs it, and a PACS test that silently does not run
# proves nothing.
assert orthanc_binary() is not None, (
    "Orthanc is not installed: bash .ci/setup (apt-get install orthanc orthanc-dicomweb)"
)

# One checkpoint answers one text to every prompt, so the reply must read as a report (findings, a blank
# line, the impression) and as grounding (one labelled box). The model sees the 128x128 CT scaled to
# 256x256 and writes pixels of that picture: the box is x 0.25-0.75, y 0.25-0.5 of the image, so x 32-96,
# y 32-64 of the source's pixels.
REPLY = "Nodule: [64, 64, 192, 128]\n\nNormal study."
EXPECTED_REGION = [32.0, 32.0, 96.0, 32.0, 96.0, 64.0, 32.0, 64.0, 32.0, 32.0]
TASKS = ("report", "ground", "ground:gsps")
ROUTED_METADATA = "MedMORouted"  # declared in orthanc.json's "UserMetadata", written by the script

# Codes of the service's SR content tree: (CodeValue, CodingSchemeDesignator).
DIAGNOSTIC_IMAGING_REPORT = ("18748-4", "LN")
OBSERVER_TYPE, DEVICE = ("121005", "DCM"), ("121007", "DCM")
FINDINGS, FINDING = ("121070", "DCM"), ("121071", "DCM")
IMPRESSIONS, IMPRESSION = ("121072", "DCM"), ("121073", "DCM")
IMAGE_REGION, SOURCE_IMAGE = ("111030", "DCM"), ("121324", "DCM")
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def ct_small() -> bytes:
    """A real 128x128 CT from pydicom's test data."""
    path = get_testdata_file("CT_small.dcm")
    assert path is not None, "pydicom's test data has no CT_small.dcm"
    return Path(path).read_bytes()


def read(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def in_new_study(data: bytes) -> bytes:
    """The same image as if from another examination: new study, series and instance."""
    dataset = read(data)
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def medmo(
    reply_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """One service for the module: loading the model is the slow part."""
    with serve(reply_checkpoint(REPLY), tmp_path_factory.mktemp("medmo") / "medmo.log") as server:
        yield server


@pytest.fixture
def pacs(medmo: RunningServer, tmp_path: Path) -> Iterator[RunningOrthanc]:
    """A fresh Orthanc per test, routing to the service."""
    with orthanc(tmp_path, medmo.url, tasks=TASKS) as running:
        yield running


def wait_for_instances(
    pacs: RunningOrthanc, study_id: str, count: int, medmo: RunningServer | None = None, timeout_s: float = 30
) -> list[dict[str, Any]]:
    """Poll until the study holds `count` instances; fail with both logs if it does not in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        instances = pacs.study_instances(study_id)
        if len(instances) >= count:
            return instances
        if time.monotonic() > deadline:
            service_log = f"\n--- MedMO Serve log ---\n{medmo.log()}" if medmo else ""
            pytest.fail(
                f"the study holds {len(instances)} instances, not {count}, after {timeout_s} s\n"
                f"--- Orthanc log ---\n{pacs.log()}{service_log}"
            )
        time.sleep(0.2)


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def children(item: Dataset, name: tuple[str, str]) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if concept(child) == name]


def only(items: list[Dataset]) -> Dataset:
    assert len(items) == 1, f"expected one item, got {len(items)}"
    return items[0]


def evidence(sr: Dataset) -> set[str]:
    """SOP Instance UIDs the SR lists as its evidence."""
    return {
        reference.ReferencedSOPInstanceUID
        for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence")
        for study in sr.get(keyword, [])
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }


def check_document(sr: Dataset, source: Dataset) -> Dataset:
    """What both SRs share: where they are filed, what they cite, who wrote them. Returns Findings."""
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert source.SOPInstanceUID in evidence(sr)

    assert sr.ValueType == "CONTAINER"
    assert concept(sr) == DIAGNOSTIC_IMAGING_REPORT
    observer_type = only(children(sr, OBSERVER_TYPE))
    assert observer_type.RelationshipType == "HAS OBS CONTEXT"
    code = observer_type.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == DEVICE
    findings = only(children(sr, FINDINGS))
    assert findings.ValueType == "CONTAINER"
    return findings


def check_report(sr: Dataset, source: Dataset) -> None:
    findings = check_document(sr, source)
    finding = only(children(findings, FINDING))
    assert finding.ValueType == "TEXT"
    assert finding.TextValue == "Nodule: [64, 64, 192, 128]"
    impression = only(children(only(children(sr, IMPRESSIONS)), IMPRESSION))
    assert impression.ValueType == "TEXT"
    assert impression.TextValue == "Normal study."


def check_grounding(sr: Dataset, source: Dataset) -> None:
    findings = check_document(sr, source)
    finding = only(children(findings, FINDING))
    assert finding.ValueType == "TEXT"
    assert finding.TextValue == "Nodule"

    region = only(children(finding, IMAGE_REGION))
    assert region.ValueType == "SCOORD"
    assert region.RelationshipType == "INFERRED FROM"
    assert region.GraphicType == "POLYLINE"
    assert [float(v) for v in region.GraphicData] == pytest.approx(EXPECTED_REGION, abs=1e-3)

    image = only(children(region, SOURCE_IMAGE))
    assert image.ValueType == "IMAGE"
    assert image.RelationshipType == "SELECTED FROM"
    reference = image.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID


def check_presentation_state(state: Dataset, source: Dataset) -> None:
    """The grounding as a Grayscale Softcopy Presentation State: the box on the source, in its study."""
    assert state.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"
    assert state.StudyInstanceUID == source.StudyInstanceUID
    assert state.PatientID == source.PatientID
    assert (
        state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
        == source.SOPInstanceUID
    )
    (annotation,) = state.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (box,) = annotation.GraphicObjectSequence
    assert [float(v) for v in box.GraphicData] == pytest.approx(EXPECTED_REGION, abs=1e-3)
    assert annotation.TextObjectSequence[0].UnformattedTextValue == "Nodule"


def is_grounding(sr: Dataset) -> bool:
    """The grounding SR is the one whose findings point at image regions."""
    return any(children(finding, IMAGE_REGION) for finding in children(only(children(sr, FINDINGS)), FINDING))


def script_lines(pacs: RunningOrthanc) -> list[str]:
    """What autoroute.lua printed to Orthanc's log."""
    return [line for line in pacs.log().splitlines() if "MedMO autoroute: " in line]


def test_a_stored_image_gets_a_report_and_a_grounding_sr_in_its_study(
    medmo: RunningServer, pacs: RunningOrthanc
) -> None:
    source_bytes = ct_small()
    source = read(source_bytes)
    stored = pacs.store(source_bytes)
    assert stored["Status"] == "Success"

    instances = wait_for_instances(pacs, stored["ParentStudy"], 1 + len(TASKS), medmo)
    assert len(instances) == 1 + len(TASKS), "more than the image and one answer per task"
    srs, states = [], []
    for instance in instances:
        if instance["ID"] == stored["ID"]:
            continue
        answer = pacs.instance_file(instance["ID"])
        if read(answer).Modality == "PR":
            states.append(read(answer))
            continue
        # highdicom reads it back as the Comprehensive SR it claims to be.
        sr = hd.sr.srread(io.BytesIO(answer))
        assert isinstance(sr, hd.sr.ComprehensiveSR)
        srs.append(sr)

    grounding = [sr for sr in srs if is_grounding(sr)]
    reports = [sr for sr in srs if not is_grounding(sr)]
    assert (len(reports), len(grounding)) == (1, 1)
    check_report(reports[0], source)
    check_grounding(grounding[0], source)
    (state,) = states
    check_presentation_state(state, source)

    # Orthanc kept the image as sent, and recorded the tasks done for it.
    assert pacs.instance_file(stored["ID"]) == source_bytes
    routed = pacs.get_json(f"/instances/{stored['ID']}/metadata?expand")[ROUTED_METADATA]
    assert routed == ",".join(sorted(TASKS))

    # Viewers find the SRs through the shipped configuration's DICOMweb plugin.
    series = pacs.get_json(f"/dicom-web/studies/{source.StudyInstanceUID}/series")
    modalities = {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in series}
    assert modalities == {
        source.SeriesInstanceUID: "CT",
        **{sr.SeriesInstanceUID: "SR" for sr in srs},
        state.SeriesInstanceUID: "PR",
    }


def test_an_image_or_sr_sent_again_is_not_routed_again(medmo: RunningServer, pacs: RunningOrthanc) -> None:
    source_bytes = ct_small()
    stored = pacs.store(source_bytes)
    instances = wait_for_instances(pacs, stored["ParentStudy"], 1 + len(TASKS), medmo)
    an_sr = next(instance for instance in instances if instance["ID"] != stored["ID"])

    # Orthanc 1.10 runs OnStoredInstance again for an instance it already has; a modality re-sending
    # a study must not file a second set of SRs, and an SR uploaded by hand must not be routed.
    assert pacs.store(source_bytes)["Status"] == "AlreadyStored"
    assert pacs.store(pacs.instance_file(an_sr["ID"]))["Status"] == "AlreadyStored"

    # Orthanc's Lua events run one at a time, in order: once another image's SRs are in, the two
    # uploads above have been handled.
    other = pacs.store(in_new_study(source_bytes))
    wait_for_instances(pacs, other["ParentStudy"], 1 + len(TASKS), medmo)
    assert len(pacs.study_instances(stored["ParentStudy"])) == 1 + len(TASKS)
    # Nor were the SRs the script stored sent to the service: it would have refused them (no pixels),
    # which the script logs as a failure.
    assert not [line for line in script_lines(pacs) if " failed: " in line], pacs.log()


def test_an_unreachable_service_leaves_the_image_stored_and_logs_no_patient_data(tmp_path: Path) -> None:
    # A loopback port nothing listens on: the connection is refused at once.
    source_bytes = ct_small()
    source = read(source_bytes)
    with orthanc(tmp_path, f"http://127.0.0.1:{free_port()}", tasks=TASKS) as pacs:
        stored = pacs.store(source_bytes)
        deadline = time.monotonic() + 30
        while len([line for line in script_lines(pacs) if " failed: " in line]) < len(TASKS):
            assert time.monotonic() < deadline, f"the script logged no failure\n{pacs.log()}"
            time.sleep(0.2)

        assert pacs.get_json("/system")["Version"]  # still serving
        assert [i["ID"] for i in pacs.study_instances(stored["ParentStudy"])] == [stored["ID"]]
        # Not routed, so not marked: sending it again once the service is up routes it.
        assert ROUTED_METADATA not in pacs.get_json(f"/instances/{stored['ID']}/metadata?expand")
        for line in script_lines(pacs):
            for value in (source.PatientID, str(source.PatientName), source.StudyInstanceUID):
                assert value not in line
