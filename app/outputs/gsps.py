"""Findings as a Grayscale Softcopy Presentation State (GSPS), built with highdicom: what PACS viewers draw.

Most viewers do not draw the boxes of a Structured Report; they do draw a presentation state's graphic
annotations on the images it references. The state belongs to the sources' patient and study (highdicom
copies both from the first source's header, as for the report), sits in a new series, references every
source instance (and frame), and holds one graphic layer named for the model: each box a closed
rectangular POLYLINE in its own image's pixel space, its label a text object at the box's corner. It
carries the VOI windows the service displayed the images with, so the viewer shows what the model was
shown, and the first source's Modality LUT (highdicom copies it).

highdicom builds states for images of one size only; a study's views differ (a frontal and a lateral
radiograph), so for those its displayed area is rewritten as one item per size, naming its images, which
is what DICOM's Displayed Area module provides for.

Its series shows the images' body part and side when they agree on one; General Series Laterality is
written empty (unknown) when the images do not say, and left out for a body part known to be unpaired.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from app import __version__
from app.imaging import DicomSource
from app.imaging.fence import raised_by_this_service
from app.outputs.dicom_sr import (
    MANUFACTURER,
    Author,
    ReportSourceError,
    anchored_header,
    check_one_patient,
    check_report_source,
)
from app.outputs.overlay import UNLABELLED, Annotation

SERIES_NUMBER = 9901  # beside the Structured Reports' 9900
LAYER = "MEDMO"
_TRIAL_AUTHOR = Author(model="trial", revision=None)


def check_presentation_sources(sources: Sequence[DicomSource]) -> None:
    """Refuse, before any inference, sources that one presentation state cannot reference: each must do
    alone, and all must be of one study (a presentation state is filed in it and references only its
    images; a prior study's need a report)."""
    for source in sources:
        check_presentation_source(source)
    check_one_patient(sources)
    if len({source.study_instance_uid for source in sources}) > 1:
        raise ReportSourceError(
            "a Presentation State references images of one study, and these are of several (a prior's, "
            "say): ask for a Structured Report (application/dicom) instead"
        )
    if len(sources) > 1:
        _check_builds(lambda: presentation_state(sources, _TRIAL_AUTHOR, []))


def check_presentation_source(source: DicomSource) -> None:
    """Refuse, before any inference, a source that a presentation state cannot reference."""
    check_report_source(source)  # the same anchoring: study, series, instance, patient
    if int(source.header.get("SamplesPerPixel", 1) or 1) != 1:
        raise ReportSourceError(
            "a Grayscale Softcopy Presentation State needs a grayscale image: ask this colour image for a "
            "Structured Report (application/dicom) instead"
        )
    _check_builds(lambda: presentation_state([source], _TRIAL_AUTHOR, []))


def _check_builds(build: Callable[[], bytes]) -> None:
    try:
        build()
    except Exception as exc:
        if raised_by_this_service(exc):
            raise
        # highdicom's message may quote the value it refused: patient data, so it is not passed on.
        raise ReportSourceError(
            "a Presentation State cannot be built for this source: its header holds a value DICOM does not "
            "allow there"
        ) from exc


def presentation_state(
    sources: Sequence[DicomSource], author: Author, annotations: Sequence[Annotation]
) -> bytes:
    """The annotations on the sources (the request's images, as sent: `Annotation.image` indexes them) as
    one GSPS covering every source, as a DICOM Part 10 file."""
    # The same header a report is anchored to: its Type 2 patient and study attributes present, each
    # valid or empty (dicom_sr.anchored_header). Each instance once, though several frames may be sent.
    referenced = {source.sop_instance_uid: anchored_header(source.header) for source in sources}
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description=f"{MANUFACTURER}: {author.model_name}"[:64]
    )
    # One annotation per image (and frame) with findings; none at all: the state then only shows the
    # images as the model was shown them.
    graphic_annotations = []
    for index, source in enumerate(sources):
        on_it = [a for a in annotations if a.image == index]
        if not on_it:
            continue
        graphic_annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[referenced[source.sop_instance_uid]],
                graphic_layer=layer,
                referenced_frame_number=source.frame if source.frames > 1 else None,
                graphic_objects=[
                    hd.pr.GraphicObject(
                        graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                        graphic_data=_rectangle(a),
                        units="PIXEL",
                    )
                    for a in on_it
                ],
                text_objects=[
                    hd.pr.TextObject(
                        text_value=(a.label or UNLABELLED)[:1024],
                        units="PIXEL",
                        anchor_point=(a.corners[0], a.corners[1]),
                        anchor_point_visible=False,
                    )
                    for a in on_it
                ],
            )
        )
    headers = list(referenced.values())
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        # highdicom takes images of one size only (for its displayed area, rewritten below when they differ).
        referenced_images=[_sized_as(headers[0], header) for header in headers],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=author.model_name[:64],
        software_versions=f"medmo-serve {__version__}",
        device_serial_number=author.model_name[:64],
        content_label=LAYER,
        content_description=f"AI findings by {author.model_name} (unverified)"[:64],
        graphic_annotations=graphic_annotations or None,
        graphic_layers=[layer],
        voi_lut_transformations=_windows(sources, referenced),
        modality_lut_transformation=_classic_multiframe_rescale(headers[0]),
    )
    _describe_series_anatomy(state, headers)
    if len({(header.Rows, header.Columns) for header in headers}) > 1:
        state.DisplayedAreaSelectionSequence = _displayed_areas(
            state.DisplayedAreaSelectionSequence[0], headers
        )
    buffer = io.BytesIO()
    state.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# Body parts (PS3.16 Annex L defined terms) that are not paired: a series of them has no laterality.
UNPAIRED_BODY_PARTS = frozenset(
    {
        "ABDOMEN", "ABDOMENPELVIS", "AORTA", "BLADDER", "BRAIN", "CHEST", "CHESTABDOMEN", "CHESTABDPELVIS",
        "COCCYX", "COLON", "CSPINE", "ESOPHAGUS", "HEAD", "HEADNECK", "HEART", "LIVER", "LSPINE",
        "MEDIASTINUM", "NECK", "PANCREAS", "PELVIS", "PROSTATE", "SACRUM", "SKULL", "SPINE", "SPLEEN",
        "SSPINE", "STOMACH", "THYROID", "TRACHEA", "TSPINE", "UTERUS", "WHOLEBODY",
    }
)  # fmt: skip


def _describe_series_anatomy(state: Dataset, headers: Sequence[Dataset]) -> None:
    """The state's series shows the images' body part, and so has their laterality (General Series).

    Laterality is Type 2C: required for a paired body part unless each image states its own. The state's
    series states it when the images agree on one side (their series' Laterality, else their Image
    Laterality); leaves it out for a body part known to be unpaired; and otherwise writes it empty, which
    is DICOM's "unknown": the images do not say which body part, or which side, they show.
    """
    body_parts = {str(header.get("BodyPartExamined") or "").strip().upper() for header in headers}
    (body_part,) = body_parts if len(body_parts) == 1 else ("",)
    if body_part:
        state.BodyPartExamined = body_part
    sides = {
        str(header.get("Laterality") or header.get("ImageLaterality") or "").strip().upper()
        for header in headers
    }
    (side,) = sides if len(sides) == 1 else ("",)
    if side in {"R", "L"}:
        state.Laterality = side
    elif body_part not in UNPAIRED_BODY_PARTS:
        state.Laterality = ""


def _sized_as(model: Dataset, header: Dataset) -> Dataset:
    """`header` as highdicom's one-size check needs it: the same elements, the first image's size."""
    if (header.Rows, header.Columns) == (model.Rows, model.Columns):
        return header
    alike = Dataset()
    for element in header:
        alike.add(element)
    del alike["Rows"], alike["Columns"]  # replaced, never changed in place: the source shares them
    alike.Rows, alike.Columns = model.Rows, model.Columns
    return alike


def _displayed_areas(whole_image: Dataset, headers: Sequence[Dataset]) -> list[Dataset]:
    """Each image shown whole: one displayed area per image size, naming the images of that size."""
    areas = []
    for rows, columns in dict.fromkeys((header.Rows, header.Columns) for header in headers):
        area = Dataset()
        for element in whole_image:
            if element.keyword != "DisplayedAreaBottomRightHandCorner":  # each area sets its own, below
                area.add(element)
        area.ReferencedImageSequence = hd.ReferencedImageSequence(
            referenced_images=[h for h in headers if (h.Rows, h.Columns) == (rows, columns)]
        )
        area.DisplayedAreaBottomRightHandCorner = [columns, rows]
        areas.append(area)
    return areas


def _windows(
    sources: Sequence[DicomSource], referenced: dict[str, Dataset]
) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    """The VOI windows the service displayed the images with: one for all, or one per window naming its
    images. None when no image had one (a flat image has width 0)."""
    windowed: dict[tuple[float, float], list[Dataset]] = {}
    for source in sources:
        window = source.window
        if window is not None and window.center is not None and window.width:
            images = windowed.setdefault((window.center, window.width), [])
            header = referenced[source.sop_instance_uid]
            if not any(image is header for image in images):
                images.append(header)
    if not windowed:
        return None
    if len(windowed) == 1 and len(next(iter(windowed.values()))) == len(referenced):
        ((center, width),) = windowed
        return [hd.pr.SoftcopyVOILUTTransformation(window_center=center, window_width=width)]
    return [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=center,
            window_width=width,
            referenced_images=hd.ReferencedImageSequence(referenced_images=images),
        )
        for (center, width), images in windowed.items()
    ]


def _classic_multiframe_rescale(header: Dataset) -> hd.ModalityLUTTransformation | None:
    """The rescale of a multi-frame image that keeps it at the top level, as classic SOP classes do (none
    is the identity).

    highdicom looks for a multi-frame image's rescale in its functional groups, where only enhanced
    SOP classes keep it; for the others it is given here. None: highdicom copies what it finds.
    """
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames <= 1 or "SharedFunctionalGroupsSequence" in header:
        return None
    return hd.ModalityLUTTransformation(
        rescale_intercept=float(header.get("RescaleIntercept", 0)),
        rescale_slope=float(header.get("RescaleSlope", 1)),
        rescale_type=str(header.get("RescaleType") or "US"),  # US: unspecified, DICOM's word for none
    )


def _rectangle(annotation: Annotation) -> np.ndarray:
    x_min, y_min, x_max, y_max = annotation.corners
    return np.array(
        [[x_min, y_min], [x_max, y_min], [x_max, y_max], [x_min, y_max], [x_min, y_min]], dtype=np.float64
    )
