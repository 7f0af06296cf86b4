"""The order a request's images are shown in: slices of a series along their normal, the rest as sent."""

from __future__ import annotations

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from app.imaging.series import anatomical_order


def slice_at(z: float, series: str = "1.2.3", orientation: list[float] | None = None) -> Dataset:
    header = Dataset()
    header.SeriesInstanceUID = series
    header.ImagePositionPatient = [-100.0, -100.0, z]
    header.ImageOrientationPatient = orientation or [1, 0, 0, 0, 1, 0]
    return header


def test_slices_of_a_series_go_along_the_normal_and_each_series_keeps_its_first_place() -> None:
    headers = [
        slice_at(30),
        None,
        slice_at(-10),
        slice_at(5, series="9.9"),
        slice_at(10),
        slice_at(-5, "9.9"),
    ]
    # Series 1.2.3 first (where its first image was sent), bottom to top; the picture; then series 9.9.
    assert anatomical_order(headers) == [2, 4, 0, 1, 5, 3]


def test_a_normal_pointing_down_orders_the_other_way() -> None:
    # Rows along x, columns along -y: the normal is -z, so the highest slice comes first.
    flipped = [1, 0, 0, 0, -1, 0]
    headers = [slice_at(z, orientation=flipped) for z in (0.0, 20.0, 10.0)]
    assert anatomical_order(headers) == [1, 2, 0]


def test_a_series_without_geometry_or_with_mixed_orientations_keeps_the_order_sent() -> None:
    missing = slice_at(5)
    del missing.ImagePositionPatient
    assert anatomical_order([slice_at(30), missing, slice_at(-10)]) == [0, 1, 2]
    localizer = slice_at(0, orientation=[0, 1, 0, 0, 0, -1])
    assert anatomical_order([slice_at(30), localizer, slice_at(-10)]) == [0, 1, 2]
    malformed = slice_at(5)
    malformed.add(DataElement(0x00200032, "LO", "a\\b\\c"))  # read leniently from a damaged file
    assert anatomical_order([slice_at(30), malformed]) == [0, 1]


def test_pictures_keep_their_places() -> None:
    assert anatomical_order([None, None, None]) == [0, 1, 2]
