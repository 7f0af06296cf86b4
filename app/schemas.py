"""Request and response models: the one source of truth for validation and for /openapi.json."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from app.engine.request import Priority
from app.imaging.dicom import WINDOW_PATTERN

BoxConvention = Literal["pixel", "rel1000"]
# A DICOM UID (PS3.5 9.1): numeric components without leading zeros, dot-separated, at most 64 characters.
DICOM_UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
SUBJECT_FIELDS = ("patient_id", "patient_id_issuer", "accession_number", "study_instance_uid")


# --- requests: the text fields of each task, shared by the multipart and the JSON encodings ---


class ImageFields(BaseModel):
    """How to read the uploaded image: what every route that takes an image accepts."""

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


class TaskFields(ImageFields):
    """What every task accepts besides the images and its own fields."""

    image_order: Literal["anatomical", "as_sent"] | None = Field(
        None,
        description="How several images are shown to the model: anatomical (the default) puts DICOM slices of "
        "one series in order along the slice normal, each series and every other image keeping the place it "
        "was sent in; as_sent shows them exactly as sent. Indexes in the answer always count as sent.",
        examples=["as_sent"],
    )

    max_new_tokens: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="Most tokens to generate for this request; at most the task's limit on this server "
        "(see /info). Default: that limit.",
        examples=[64],
    )
    stream: bool | None = Field(
        None,
        description="true: answer with Server-Sent Events as the model writes (delta events, then one result "
        "event holding this route's JSON response), as Accept: text/event-stream does.",
        examples=[True],
    )
    logprobs: bool | None = Field(
        None,
        description="true: the response adds mean_logprob, the mean log-probability of the answer's tokens "
        "under the model (a confidence a program can threshold). Default: false.",
        examples=[True],
    )
    priority: Priority | None = Field(
        None,
        description="How soon to serve it: stat before urgent before routine (the default; the X-Priority "
        "header says the same, and lets a full queue refuse before the upload is read). Places in the queue "
        "are kept for stat work (MEDMO_STAT_RESERVE); a waiting request climbs one priority every "
        "MEDMO_PRIORITY_AGING_S.",
        examples=["stat"],
    )
    # Who the images are of, for a FHIR answer (Accept: application/fhir+json) about images without a DICOM
    # header: a PNG or JPEG has no patient, and the service invents none. Refused with DICOM images.
    patient_id: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Images without a DICOM header only (refused with DICOM images, whose header says who "
        "the patient is): the patient's identifier, which a FHIR answer's Patient carries. Without it, the "
        "bundle has no Patient.",
        examples=["MRN-0042"],
    )
    patient_id_issuer: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="With patient_id: who assigned it, an OID or URI (the identifier's system) or a name "
        "(its assigner).",
        examples=["urn:oid:1.2.840.113619.6.197"],
    )
    accession_number: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Images without a DICOM header only: the order's accession number, which a FHIR "
        "answer's DiagnosticReport is based on.",
        examples=["ACC-2025-0042"],
    )
    study_instance_uid: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=DICOM_UID_PATTERN,
        description="Images without a DICOM header only: the study's Study Instance UID, a DICOM UID "
        "(digits and dots, at most 64), which a FHIR answer names the study by.",
        examples=["1.2.840.113619.2.1"],
    )


# --- answers chosen among given ones (/classify's labels, /vqa's choices) ---

MIN_LABELS = 2
MAX_LABELS = 32
MAX_LABEL_CHARS = 64


def _json_array_in_a_text_field(value: object) -> object:
    """A form field or a query parameter is one string: a list arrives there as a JSON array."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ValueError('must be a JSON array of strings, e.g. ["pneumonia", "normal"]') from None


def _distinct(labels: list[str]) -> list[str]:
    if len(set(labels)) != len(labels):
        raise ValueError("each must differ from the others (spaces around them do not count)")
    return labels


Label = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_LABEL_CHARS)]
Labels = Annotated[
    list[Label],
    Field(min_length=MIN_LABELS, max_length=MAX_LABELS),
    BeforeValidator(_json_array_in_a_text_field),
    AfterValidator(_distinct),
]
LABELS_BOUNDS = (
    f"{MIN_LABELS} to {MAX_LABELS} of them, each 1 to {MAX_LABEL_CHARS} characters and distinct once spaces "
    "around it are trimmed. In a multipart form (or the query string of a DICOM body), one field holding "
    "them as a JSON array."
)


# --- responses ---

_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


class ImageSize(BaseModel):
    width: int = Field(description="Width of the uploaded image in pixels, as displayed.", examples=[2048])
    height: int = Field(description="Height of the uploaded image in pixels, as displayed.", examples=[2500])


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model, image tokens included.", examples=[1320])
    completion_tokens: int = Field(description="Tokens the model generated.", examples=[58])


class ScoredLabel(BaseModel):
    """One of the answers the model chose among, with how likely it makes it."""

    label: str = Field(description="The answer, as given (trimmed).", examples=["pneumothorax"])
    probability: float = Field(
        ge=0,
        le=1,
        description="Its probability among the answers given: the softmax of their log-probabilities, so "
        "that the probabilities of all of them add up to 1.",
        examples=[0.82],
    )
    logprob: float = Field(
        description="The model's log-probability of answering exactly this and ending its answer: the sum "
        "over its tokens, the end of the turn included.",
        examples=[-0.31],
    )


class TopLabel(BaseModel):
    label: str = Field(description="The most probable answer.", examples=["pneumothorax"])
    probability: float = Field(
        ge=0, le=1, description="Its probability among the answers given.", examples=[0.82]
    )


class Timing(BaseModel):
    queue_ms: float = Field(
        description="Time waiting for the model to start on this request.", examples=[12.5]
    )
    inference_ms: float = Field(
        description="Time from the model starting on this request to its last token.", examples=[1840.0]
    )
    total_ms: float = Field(description="Time from receiving the request to answering it.", examples=[1901.2])


class WindowInfo(BaseModel):
    center: float | None = Field(
        description="Window centre in modality units; null for a VOI LUT table.", examples=[40.0]
    )
    width: float | None = Field(
        description="Window width in modality units; null for a VOI LUT table.", examples=[400.0]
    )
    source: str = Field(
        description="request, a preset's name, file (the first window stored in the file), voi_lut, or "
        "full_range (no window anywhere: the values present were stretched).",
        examples=["file"],
    )


class DicomInfo(BaseModel):
    """The source instance, by identifiers only: no patient data is ever returned."""

    study_instance_uid: str = Field(
        description="Study Instance UID of the source.", examples=["1.2.840.113619.2.1"]
    )
    series_instance_uid: str = Field(
        description="Series Instance UID of the source.", examples=["1.2.840.113619.2.1.2"]
    )
    sop_instance_uid: str = Field(description="SOP Instance UID of the source.", examples=[_UID])
    sop_class_uid: str = Field(
        description="SOP Class UID of the source.", examples=["1.2.840.10008.5.1.4.1.1.2"]
    )
    modality: str | None = Field(description="Modality of the source, if stated.", examples=["CT"])
    frame: int = Field(description="The frame that was read, 1 being the first.", examples=[1])
    frames: int = Field(description="Frames in the object.", examples=[1])
    window: WindowInfo | None = Field(
        description="How grayscale values were displayed; null for colour.",
        examples=[{"center": 40.0, "width": 400.0, "source": "file"}],
    )


_DICOM_EXAMPLE = {
    "study_instance_uid": "1.2.840.113619.2.1",
    "series_instance_uid": "1.2.840.113619.2.1.2",
    "sop_instance_uid": _UID,
    "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
    "modality": "CT",
    "frame": 1,
    "frames": 1,
    "window": {"center": 40.0, "width": 400.0, "source": "file"},
}


class ImageInfo(BaseModel):
    """One image of the request, in the order it was sent (its index is what findings name)."""

    index: int = Field(description="Its place in the request as sent, 0 for the first.", examples=[0])
    shown_as: int = Field(
        description='Its place among the images as the model was shown them, 1 for the first ("Image 1" in '
        "the prompt): slices of a series in anatomical order, unless image_order was as_sent.",
        examples=[1],
    )
    caption: str | None = Field(description="The caption sent with it, if any.", examples=["frontal"])
    width: int = Field(description="Width in pixels, as displayed.", examples=[2048])
    height: int = Field(description="Height in pixels, as displayed.", examples=[2500])
    dicom: DicomInfo | None = Field(
        None,
        description="Present when the image was DICOM.",
        examples=[_DICOM_EXAMPLE],
    )


class TaskResponse(BaseModel):
    request_id: str = Field(
        description="Identifier of this request, also in the X-Request-ID header.",
        examples=["5d0c3a0e9b8f4c2a8f1e2b7d6c5a4f3e"],
    )
    model: str = Field(description="The model that answered.", examples=["MBZUAI/MedMO-8B-Next"])
    image: ImageSize = Field(
        description="Size of the uploaded image (the first, when several were sent).",
        examples=[{"width": 2048, "height": 2500}],
    )
    images: list[ImageInfo] = Field(
        description="Every image of the request, in the order sent.",
        examples=[
            [{"index": 0, "shown_as": 1, "caption": "frontal", "width": 2048, "height": 2500, "dicom": None}]
        ],
    )
    dicom: DicomInfo | None = Field(
        None,
        description="Present when the upload (the first, when several were sent) was DICOM.",
        examples=[_DICOM_EXAMPLE],
    )
    usage: Usage = Field(
        description="Tokens in and out.", examples=[{"prompt_tokens": 1320, "completion_tokens": 58}]
    )
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: the model ended its answer; length: it was cut at max_new_tokens (or, when that was "
        "not given, at what the context left after the images and prompt).",
        examples=["stop"],
    )
    timing: Timing = Field(
        description="Where the time went.",
        examples=[{"queue_ms": 12.5, "inference_ms": 1840.0, "total_ms": 1901.2}],
    )
    mean_logprob: float | None = Field(
        None,
        description="With logprobs=true: the mean log-probability of the answer's tokens under the model (0 "
        "would be certainty); null otherwise.",
        examples=[-0.42],
    )


# --- the PACS (DICOMweb) ---


class StoredInstance(BaseModel):
    """An answer stored into the PACS with STOW-RS, in the source's study."""

    object: Literal["sr", "gsps"] = Field(
        description="sr: the DICOM Structured Report; gsps: the Grayscale Softcopy Presentation State.",
        examples=["sr"],
    )
    study_instance_uid: str = Field(
        description="The study it was filed in: the source's.", examples=["1.2.840.113619.2.1"]
    )
    series_instance_uid: str = Field(
        description="Its own new series.", examples=["1.2.826.0.1.3680043.10.511.3.1"]
    )
    sop_instance_uid: str = Field(
        description="The object's SOP Instance UID.", examples=["1.2.826.0.1.3680043.10.511.3.2"]
    )
    sop_class_uid: str = Field(
        description="Comprehensive 3D SR (the TID 1500 measurement report) or Grayscale Softcopy Presentation "
        "State.",
        examples=["1.2.840.10008.5.1.4.1.1.88.34"],
    )
    retrieve_url: str | None = Field(
        description="Where the PACS says it can be retrieved (WADO-RS), as the PACS wrote it; null if it did not say.",
        examples=[
            "http://orthanc:8042/dicom-web/studies/1.2.840.113619.2.1/series/1.2.826.0.1.3680043.10.511.3.1/instances/1.2.826.0.1.3680043.10.511.3.2"
        ],
    )


# --- operations ---


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code.", examples=["unreadable_image"])
    message: str = Field(description="What went wrong, for a person.", examples=["the image data is corrupt"])
    request_id: str | None = Field(
        description="Identifier of the failed request.", examples=["5d0c3a0e9b8f4c2a8f1e2b7d6c5a4f3e"]
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail = Field(
        description="What went wrong.",
        examples=[
            {"code": "unreadable_image", "message": "the image data is corrupt", "request_id": "5d0c3a0e"}
        ],
    )


class Health(BaseModel):
    status: Literal[
        "ok", "starting", "downloading", "loading", "warming_up", "ready", "draining", "stopped", "dead"
    ] = Field(
        description="ok (alive), ready, or why not: starting, downloading (the weights, on a first start), "
        "loading (the weights onto the device), warming_up (the engine), draining, stopped, dead.",
        examples=["ready"],
    )
    progress: float | None = Field(
        None,
        ge=0,
        le=100,
        description="While downloading, loading or warming up: how far along that phase is, in percent, when "
        "known. Absent otherwise.",
        examples=[42.5],
    )


class Limits(BaseModel):
    max_upload_bytes: int = Field(
        description="Largest accepted image file; a request's images together too.", examples=[67108864]
    )
    max_image_pixels: int = Field(description="Largest decoded image.", examples=[50000000])
    max_images: int = Field(description="Most images in one request.", examples=[8])
    max_total_pixels: int = Field(
        description="Largest decoded area of a request's images together.", examples=[100000000]
    )
    max_context: int = Field(
        description="Most tokens per request: images, prompt and answer together.", examples=[4096]
    )
    min_pixels: int = Field(description="Smallest image area fed to the model.", examples=[65536])
    max_pixels: int = Field(description="Largest image area fed to the model.", examples=[1638400])
    max_new_tokens: dict[str, int] = Field(
        description="Generation limit per task.", examples=[{"vqa": 256, "report": 1024, "ground": 512}]
    )


class EngineInfo(BaseModel):
    name: Literal["continuous", "generate"] = Field(
        description="continuous (requests join and leave the running batch at every step) or generate "
        "(whole batches through transformers' generate()).",
        examples=["continuous"],
    )
    slots: int | None = Field(
        None, description="continuous: requests decoded together (KV cache slots).", examples=[64]
    )
    context: int | None = Field(None, description="continuous: most tokens per request.", examples=[4096])
    kv_cache_gib: float | None = Field(
        None, description="continuous: memory the KV cache takes.", examples=[36.0]
    )
    decode_graphs: str | None = Field(
        None,
        description="continuous: how decode steps run: captured graphs, or eager and why.",
        examples=["60 graphs (10 batch x 6 span buckets)"],
    )
    compile: str | None = Field(
        None,
        description="continuous: whether the decode step runs through torch.compile, and what compiling cost.",
        examples=["compiled, 60 buckets in 412 s"],
    )
    prefill_token_budget: int | None = Field(
        None, description="continuous: most prompt tokens started in one step.", examples=[8192]
    )
    max_batch_size: int | None = Field(None, description="generate: most requests per batch.", examples=[16])
    max_wait_ms: float | None = Field(
        None, description="generate: how long a batch waits for company.", examples=[10.0]
    )


class Info(BaseModel):
    model: str = Field(description="Hub id or folder of the model served.", examples=["MBZUAI/MedMO-8B-Next"])
    revision: str | None = Field(description="Hub revision, if pinned.", examples=["main"])
    device: str = Field(description="Where the model runs.", examples=["cuda"])
    dtype: str = Field(description="Weights' data type.", examples=["bfloat16"])
    attn_implementation: str = Field(description="Attention kernel in use.", examples=["sdpa"])
    box_convention: BoxConvention = Field(description="How boxes are read.", examples=["pixel"])
    engine: EngineInfo = Field(
        description="The engine serving requests and its sizes.",
        examples=[
            {
                "name": "continuous",
                "slots": 64,
                "context": 4096,
                "kv_cache_gib": 36.0,
                "decode_graphs": "60 graphs (10 batch x 6 span buckets)",
                "prefill_token_budget": 8192,
            }
        ],
    )
    limits: Limits = Field(
        description="Limits in force.",
        examples=[
            {
                "max_upload_bytes": 67108864,
                "max_image_pixels": 50000000,
                "max_images": 8,
                "max_total_pixels": 100000000,
                "max_context": 4096,
                "min_pixels": 65536,
                "max_pixels": 1638400,
                "max_new_tokens": {"vqa": 256, "report": 1024, "ground": 512},
            }
        ],
    )
