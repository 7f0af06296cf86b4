"""What a series-level request pulls from the PACS, found with QIDO-RS searches before any instance is
fetched: the series' instances, and on request the same patient's latest earlier study of the same
modality (its prior) with the series to compare; `series_choice` decides which of their instances to take.

The prior is found from the current study's own search answer: its Patient ID (and issuer) and date. The
Patient ID is patient data: it travels only in the search sent to the configured PACS, and no log line
holds it (nor any UID); a log line says only why no prior was used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

from pydicom.dataset import Dataset

from app.pacs.dicomweb import Dicomweb, InstanceUids, PacsError, PacsNotFoundError
from app.pacs.series_choice import (
    choose,
    earlier_studies,
    instance_uid,
    label,
    matching_series,
    modality_of,
    ordered,
    patient_key,
    study_date,
)

logger = logging.getLogger("medmo.dicomweb")


@dataclass(frozen=True)
class ListedSeries:
    """A series' instances, as the PACS's search lists them (at least one)."""

    study: str
    series: str
    headers: list[Dataset]

    @property
    def modality(self) -> str | None:
        return modality_of(self.headers)

    @property
    def available(self) -> int:
        """How many of its instances can be taken: those in its order (a localizer among slices is not)."""
        return len(ordered(self.headers))

    def taken(self, count: int) -> tuple[list[InstanceUids], list[str | None]]:
        """`count` of its instances, chosen by the rule, in the order to send them, and their labels."""
        chosen = choose(self.headers, count)
        uids = [instance_uid(choice.header) for choice in chosen]
        if None in uids:
            raise PacsError("the PACS listed an instance of the series without its SOP Instance UID")
        instances = [InstanceUids(self.study, self.series, uid) for uid in uids if uid is not None]
        return instances, [label(choice, self.modality) for choice in chosen]


@dataclass(frozen=True)
class Prior:
    """The series of the latest earlier study to compare with, and the two studies' dates."""

    series: ListedSeries
    current_date: date
    prior_date: date


async def listed_series(pacs: Dicomweb, study: str, series: str) -> ListedSeries:
    """The series' instances; PacsNotFoundError when the PACS lists none."""
    headers = await pacs.search_instances(study, series)
    if not headers:
        raise PacsNotFoundError("the PACS has no instances in a series with these UIDs")
    return ListedSeries(study, series, headers)


async def prior_of(pacs: Dicomweb, current: ListedSeries) -> Prior | None:
    """The series to compare `current` with: of the same patient's latest study dated before its own that
    holds a series of its modality; None when there is none, or when the current study does not say for
    sure whose and when it is."""
    modality = current.modality
    if modality is None:
        logger.debug("no prior: the series states no modality")
        return None
    this_study = next(
        (
            found
            for found in await pacs.search_studies({"StudyInstanceUID": current.study})
            if str(found.get("StudyInstanceUID", "")).strip() == current.study
        ),
        None,
    )
    patient = patient_key(this_study) if this_study is not None else None
    current_date = study_date(this_study) if this_study is not None else None
    if this_study is None or patient is None or current_date is None:
        logger.debug("no prior: the study states no date, or no Patient ID that can be searched for exactly")
        return None
    candidates = await pacs.search_studies(
        {
            "PatientID": patient[0],
            # Up to the study's day: one earlier that day is not a prior, and is left out by earlier_studies.
            "StudyDate": f"-{current_date:%Y%m%d}",
            "ModalitiesInStudy": modality,
        }
    )
    for earlier in earlier_studies(candidates, this_study, modality):
        found = matching_series(
            await pacs.search_series(earlier.study_instance_uid, {"Modality": modality}),
            current.headers[0],
            modality,
        )
        if found is None:
            continue
        try:
            series = await listed_series(
                pacs, earlier.study_instance_uid, str(found.SeriesInstanceUID).strip()
            )
        except PacsNotFoundError:  # deleted since the search, say
            continue
        return Prior(series, current_date, earlier.study_date)
    logger.debug("no prior: the PACS holds no earlier study of the patient with a series of this modality")
    return None
