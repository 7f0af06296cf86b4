"""Request and response models: the one source of truth for validation and for /openapi.json."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.imaging.dicom import WINDOW_PATTERN
from app.settings import BoxConvention

TaskName = Literal["vqa", "report", "ground"]


# --- requests: the text fields of each task, shared by the multipart and the JSON encodings ---


class TaskFields(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    window: str | None = Field(
        None,
        max_length=32,
        pattern=WINDOW_PATTERN,
        description="DICOM grayscale only: the window to display the image with, a preset (lung, mediastinum, "
        "soft_tissue, bone, brain) or 'center,width' in modality units (Hounsfield for CT). Default: the "
        "window stored in the file, else the full range.",
        examples=["lung", "40,400"],
    )
    frame: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="DICOM only: the frame of a multi-frame object to read, 1 being the first. Default: the middle one.",
        examples=[12],
    )


class VqaFields(TaskFields):
    question: str = Field(
        min_length=1,
        max_length=4000,
        description="The clinical question about the image.",
        examples=["Is there a pleural effusion?"],
    )


class ReportFields(TaskFields):
    modality: str | None = Field(
        None,
        max_length=64,
        description="Imaging modality, if known; it is named in the prompt.",
        examples=["chest X-ray"],
    )
    indication: str | None = Field(
        None,
        max_length=4000,
        description="Clinical context (indication, history) given to the model with the image.",
        examples=["Fever and cough for three days."],
    )


class GroundFields(TaskFields):
    target: str | None = Field(
        None,
        max_length=500,
        description="What to find and box. Default: all visible abnormalities.",
        examples=["pleural effusion"],
    )
    modality: str | None = Field(
        None, max_length=64, description="Imaging modality, if known.", examples=["X-ray"]
    )


# --- responses ---


class ImageSize(BaseModel):
    width: int = Field(description="Width of the uploaded image in pixels, as displayed.", examples=[2048])
    height: int = Field(description="Height of the uploaded image in pixels, as displayed.", examples=[2500])


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model, image tokens included.", examples=[1320])
    completion_tokens: int = Field(description="Tokens the model generated.", examples=[58])


class Timing(BaseModel):
    queue_ms: float = Field(description="Time waiting for a batch to start.", examples=[12.5])
    inference_ms: float = Field(description="Duration of the batch's generate() call.", examples=[1840.0])
    total_ms: float = Field(description="Time from receiving the request to answering it.", examples=[1901.2])


class WindowInfo(BaseModel):
    center: float | None = Field(description="Window centre in modality units; null for a VOI LUT table.")
    width: float | None = Field(description="Window width in modality units; null for a VOI LUT table.")
    source: str = Field(
        description="request, a preset's name, file (the first window stored in the file), voi_lut, or "
        "full_range (no window anywhere: the values present were stretched).",
        examples=["file"],
    )


class DicomInfo(BaseModel):
    """The source instance, by identifiers only: no patient data is ever returned."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None = Field(examples=["CT"])
    frame: int = Field(description="The frame that was read, 1 being the first.")
    frames: int = Field(description="Frames in the object.")
    window: WindowInfo | None = Field(description="How grayscale values were displayed; null for colour.")


class TaskResponse(BaseModel):
    request_id: str = Field(description="Identifier of this request, also in the X-Request-ID header.")
    model: str = Field(description="The model that answered.", examples=["MBZUAI/MedMO-8B-Next"])
    image: ImageSize
    dicom: DicomInfo | None = Field(None, description="Present when the upload was DICOM.")
    usage: Usage
    timing: Timing


class VqaResponse(TaskResponse):
    task: Literal["vqa"] = "vqa"
    answer: str = Field(description="The model's answer.", examples=["Yes, a small left pleural effusion."])


class Report(BaseModel):
    findings: str = Field(description="The findings section.", examples=["The lungs are clear."])
    impression: str | None = Field(
        description="The impression section; null when the model wrote none.",
        examples=["No acute cardiopulmonary process."],
    )
    text: str = Field(description="The report exactly as the model wrote it.")


class ReportResponse(TaskResponse):
    task: Literal["report"] = "report"
    report: Report


class Box(BaseModel):
    x_min: float = Field(examples=[0.157])
    y_min: float = Field(examples=[0.645])
    x_max: float = Field(examples=[0.233])
    y_max: float = Field(examples=[0.759])


class GroundedFinding(BaseModel):
    label: str | None = Field(description="What the model says is there; null if it gave no name.")
    box: Box = Field(description="Corners as fractions, 0 to 1, of the uploaded image's width and height.")
    box_px: Box = Field(description="The same corners in the uploaded image's pixels.")


class GroundResponse(TaskResponse):
    task: Literal["ground"] = "ground"
    findings: list[GroundedFinding]
    box_convention: BoxConvention = Field(
        description="How the model's coordinates were read: pixel (absolute pixels of the image the model saw) "
        "or rel1000 (0-1000 scale)."
    )
    raw_text: str = Field(description="The model's output exactly as written.")


# --- operations ---


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code.", examples=["unreadable_image"])
    message: str = Field(description="What went wrong, for a person.", examples=["the image data is corrupt"])
    request_id: str | None = Field(description="Identifier of the failed request.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "starting", "ready", "draining", "stopped", "dead", "unavailable"]


class Limits(BaseModel):
    max_upload_bytes: int
    max_image_pixels: int
    min_pixels: int
    max_pixels: int
    max_new_tokens: dict[str, int]


class Info(BaseModel):
    model: str
    revision: str | None
    device: str
    dtype: str
    attn_implementation: str
    box_convention: BoxConvention
    limits: Limits
