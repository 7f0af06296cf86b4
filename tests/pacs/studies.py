"""Synthetic examinations as a PACS receives them, built with pydicom: a CT series and a CR study.

The CT is a stack of axial slices with the geometry a scanner writes (orientation, positions along the
patient's axis, spacing, thickness, a frame of reference), numbered the way many scanners number a
feet-first acquisition: Instance Number 1 is the highest slice. So choosing "the middle slice by
position" and "the middle Instance Number" differ unless the router reads the positions. Patient data
are present and recognisable, for the tests that check it never reaches a log.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
PATIENT_NAME = "Canary^Pacs^Patient"
PATIENT_ID = "PACS-CANARY-7731"


@dataclass(frozen=True)
class Examination:
    """The files of one study, in the order a modality sends them, and their datasets."""

    files: list[bytes]
    datasets: list[Dataset]

    @property
    def study_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    def extra_slice_on_top(self) -> bytes:
        """One more slice of the series, one spacing above the highest (a CT series that grows)."""
        top = max(self.datasets, key=lambda dataset: float(dataset.ImagePositionPatient[2]))
        dataset = copy.deepcopy(top)
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = 0
        dataset.ImagePositionPatient = [
            *top.ImagePositionPatient[:2],
            top.ImagePositionPatient[2] + top.SliceThickness,
        ]
        return _file(dataset, str(top.SOPClassUID))


def _patient_and_study(dataset: Dataset, study_uid: str, accession: str, study_date: str) -> None:
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = "19610214"
    dataset.PatientSex = "F"
    dataset.StudyInstanceUID = study_uid
    dataset.StudyDate, dataset.StudyTime = study_date, "101500"
    dataset.AccessionNumber = accession
    dataset.StudyID = "1"
    dataset.ReferringPhysicianName = ""


def _file(dataset: Dataset, sop_class: str) -> bytes:
    dataset.SOPClassUID = sop_class
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _phantom(size: int, z_mm: float) -> np.ndarray:
    """An axial slice of an elliptic body (soft tissue) with two lungs (air) that shrink towards the
    ends: each slice differs, as real ones do. In Hounsfield units + 1024 (the stored values)."""
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    body = (x / 0.45) ** 2 + (y / 0.35) ** 2 < 1
    lung_radius = max(0.02, 0.12 - abs(z_mm) / 400)
    lungs = ((x - 0.18) ** 2 + y**2 < lung_radius**2) | ((x + 0.18) ** 2 + y**2 < lung_radius**2)
    hounsfield = np.where(body, 40, -1000) - np.where(lungs, 840, 0)
    return (hounsfield + 1024).astype(np.uint16)


def ct_series(
    slices: int = 40, size: int = 64, spacing_mm: float = 2.5, study_date: str = "20250312"
) -> Examination:
    """An axial CT series of `slices` slices, from z = -spacing*(slices-1)/2 upwards, numbered from the top.
    Each call is a new study of the same patient: an earlier `study_date` makes a prior."""
    study_uid, series_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    datasets, files = [], []
    for index in range(slices):
        z_mm = -spacing_mm * (slices - 1) / 2 + index * spacing_mm
        dataset = Dataset()
        _patient_and_study(dataset, study_uid, f"ACC-CT-{study_date}", study_date)
        dataset.Modality = "CT"
        dataset.SeriesInstanceUID, dataset.SeriesNumber = series_uid, 2
        dataset.SeriesDescription = "Chest 2.5 mm"
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = slices - index  # 1 is the highest slice
        dataset.FrameOfReferenceUID = frame_of_reference
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [-160.0, -160.0, z_mm]
        dataset.SliceLocation = z_mm
        dataset.SliceThickness = spacing_mm
        dataset.PixelSpacing = [320 / size, 320 / size]
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.Rows = dataset.Columns = size
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.PixelRepresentation = 0
        dataset.RescaleIntercept, dataset.RescaleSlope, dataset.RescaleType = -1024, 1, "HU"
        dataset.WindowCenter, dataset.WindowWidth = -600, 1500
        dataset.PixelData = _phantom(size, z_mm).tobytes()
        files.append(_file(dataset, CTImageStorage))
        datasets.append(dataset)
    return Examination(files, datasets)


def cr_study(
    views: tuple[str, ...] = ("PA", "LL"), size: int = 96, study_date: str = "20250312"
) -> Examination:
    """A chest radiograph study: one series, one image per view. Each call is a new study of the same
    patient: an earlier `study_date` makes a prior."""
    study_uid, series_uid = generate_uid(), generate_uid()
    datasets, files = [], []
    for number, view in enumerate(views, start=1):
        dataset = Dataset()
        _patient_and_study(dataset, study_uid, f"ACC-CR-{study_date}", study_date)
        dataset.Modality = "CR"
        dataset.SeriesInstanceUID, dataset.SeriesNumber = series_uid, 1
        dataset.SOPInstanceUID = generate_uid()
        dataset.InstanceNumber = number
        dataset.ViewPosition = view
        dataset.BodyPartExamined = "CHEST"
        dataset.Rows = dataset.Columns = size
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
        dataset.PixelRepresentation = 0
        gradient = np.linspace(200, 3800, size * size).reshape(size, size) + number * 50
        dataset.PixelData = gradient.astype(np.uint16).tobytes()
        files.append(_file(dataset, CR_IMAGE_STORAGE))
        datasets.append(dataset)
    return Examination(files, datasets)


def middle_by_position(examination: Examination) -> Dataset:
    """The slice halfway through the volume (of 40, the 21st from the bottom)."""
    stack = sorted(examination.datasets, key=lambda dataset: float(dataset.ImagePositionPatient[2]))
    return stack[len(stack) // 2]
