"""Findings as a Grayscale Softcopy Presentation State (GSPS), built with highdicom: what PACS viewers draw.

Most viewers do not draw the boxes of a Structured Report; they do draw a presentation state's graphic
annotations on the image it references. The state belongs to the source's patient and study (highdicom
copies both from the source header, as for the report), sits in a new series, references the source
instance (and frame), and holds one graphic layer named for the model: each box a closed rectangular
POLYLINE in the source's pixel space, its label a text object at the box's corner. It carries the VOI
window the service displayed the image with, so the viewer shows what the model was shown, and the
source's Modality LUT (highdicom copies it).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from app import __version__
from app.imaging import DicomSource
from app.imaging.fence import raised_by_this_service
from app.outputs.dicom_sr import MANUFACTURER, Author, ReportSourceError, anchored_header, check_report_source
from app.outputs.overlay import UNLABELLED, Annotation

SERIES_NUMBER = 9901  # beside the Structured Reports' 9900
LAYER = "MEDMO"
_TRIAL_AUTHOR = Author(model="trial", revision=None)


def check_presentation_source(source: DicomSource) -> None:
    """Refuse, before any inference, a source that a presentation state cannot reference."""
    check_report_source(source)  # the same anchoring: study, series, instance, patient
    if int(source.header.get("SamplesPerPixel", 1) or 1) != 1:
        raise ReportSourceError(
            "a Grayscale Softcopy Presentation State needs a grayscale image: ask this colour image for a "
            "Structured Report (application/dicom) instead"
        )
    try:
        presentation_state(source, _TRIAL_AUTHOR, [])
    except Exception as exc:
        if raised_by_this_service(exc):
            raise
        # highdicom's message may quote the value it refused: patient data, so it is not passed on.
        raise ReportSourceError(
            "a Presentation State cannot be built for this source: its header holds a value DICOM does not "
            "allow there"
        ) from exc


def presentation_state(source: DicomSource, author: Author, annotations: Sequence[Annotation]) -> bytes:
    """The annotations on the source image as a GSPS, as a DICOM Part 10 file."""
    frame = source.frame if source.frames > 1 else None
    # The same header a report is anchored to: its Type 2 patient and study attributes present, each
    # valid or empty (dicom_sr.anchored_header).
    referenced = anchored_header(source.header)
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description=f"{MANUFACTURER}: {author.model_name}"[:64]
    )
    graphic_objects = [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=_rectangle(a), units="PIXEL"
        )
        for a in annotations
    ]
    text_objects = [
        hd.pr.TextObject(
            text_value=(a.label or UNLABELLED)[:1024],
            units="PIXEL",
            anchor_point=(a.corners[0], a.corners[1]),
            anchor_point_visible=False,
        )
        for a in annotations
    ]
    # No finding, no annotation: the state then only shows the image as the model was shown it.
    annotation = (
        hd.pr.GraphicAnnotation(
            referenced_images=[referenced],
            graphic_layer=layer,
            referenced_frame_number=frame,
            graphic_objects=graphic_objects,
            text_objects=text_objects,
        )
        if annotations
        else None
    )
    window = source.window
    voi = (
        [hd.pr.SoftcopyVOILUTTransformation(window_center=window.center, window_width=window.width)]
        if window is not None and window.center is not None and window.width  # a flat image has width 0
        else None
    )
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[referenced],
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
        graphic_annotations=[annotation] if annotation is not None else None,
        graphic_layers=[layer],
        voi_lut_transformations=voi,
        modality_lut_transformation=_classic_multiframe_rescale(referenced),
    )
    buffer = io.BytesIO()
    state.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
