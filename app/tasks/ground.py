"""Grounding: ask MedMO for boxes around findings, read them back in any syntax it writes.

Coordinates are mapped back through the size of the picture the model actually saw (the processor's
resize of the upload), not the upload's size: MedMO writes absolute pixels of its input image. Base
Qwen3-VL writes a 0-1000 relative scale instead; which one applies is a setting, reported in every response.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import highdicom as hd
from pydantic import BaseModel, Field
from pydicom.sr.codedict import codes

from app.imaging import DicomSource
from app.outputs.dicom_sr import boxed_finding, container_item
from app.outputs.overlay import Annotation
from app.schemas import BoxConvention, TaskFields, TaskResponse
from app.tasks.base import Reading, Task
from app.tasks.text import strip_wrappers

ALL_ABNORMALITIES = "any visible diseases or abnormalities"
UNLABELLED = "Unnamed finding"


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


class Box(BaseModel):
    x_min: float = Field(description="Left edge.", examples=[0.157])
    y_min: float = Field(description="Top edge.", examples=[0.645])
    x_max: float = Field(description="Right edge.", examples=[0.233])
    y_max: float = Field(description="Bottom edge.", examples=[0.759])


class GroundedFinding(BaseModel):
    label: str | None = Field(
        description="What the model says is there; null if it gave no name.", examples=["Fractures"]
    )
    box: Box = Field(
        description="Corners as fractions, 0 to 1, of the uploaded image's width and height.",
        examples=[{"x_min": 0.157, "y_min": 0.645, "x_max": 0.233, "y_max": 0.759}],
    )
    box_px: Box = Field(
        description="The same corners in the uploaded image's pixels.",
        examples=[{"x_min": 157.3, "y_min": 516.0, "x_max": 232.9, "y_max": 607.0}],
    )


class GroundResponse(TaskResponse):
    task: Literal["ground"] = Field("ground", description="The task that answered.", examples=["ground"])
    findings: list[GroundedFinding] = Field(
        description="Every box the model drew, in the order it wrote them.",
        examples=[
            [
                {
                    "label": "Fractures",
                    "box": {"x_min": 0.157, "y_min": 0.645, "x_max": 0.233, "y_max": 0.759},
                    "box_px": {"x_min": 157.3, "y_min": 516.0, "x_max": 232.9, "y_max": 607.0},
                }
            ]
        ],
    )
    box_convention: BoxConvention = Field(
        description="How the model's coordinates were read: pixel (absolute pixels of the image the model saw) "
        "or rel1000 (0-1000 scale).",
        examples=["pixel"],
    )
    raw_text: str = Field(
        description="The model's output exactly as written.",
        examples=["Fractures <box>[[156, 516, 231, 607]]</box>"],
    )


def ground_prompt(fields: GroundFields, convention: BoxConvention) -> str:
    subject = f"this {fields.modality} image" if fields.modality else "this image"
    target = fields.target or ALL_ABNORMALITIES
    units = "in pixel values" if convention == "pixel" else "on a 0-1000 scale relative to the image size"
    return (
        f"Detect {target} in {subject}. For each detected finding, provide: the disease name/names, "
        f"and bounding box coordinates as: [ [x_min, y_min, x_max, y_max] ] {units}."
    )


@dataclass(frozen=True)
class RawBox:
    label: str | None
    coords: tuple[float, float, float, float]  # x1, y1, x2, y2 as the model wrote them


# --- reading boxes out of text ---

_NUM = r"-?\d+(?:\.\d+)?"
_SEP = r"\s*[,\s]\s*"
# (x1, y1), (x2, y2): Qwen-VL's point pairs, with or without <box> or <|box_start|> around them.
_POINT_PAIR = re.compile(rf"\(\s*({_NUM}){_SEP}({_NUM})\s*\)\s*,?\s*\(\s*({_NUM}){_SEP}({_NUM})\s*\)")
# [x1, y1, x2, y2] or (x1, y1, x2, y2): exactly four numbers between brackets.
_BRACKETED = re.compile(rf"[\[(]\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*[\])]")
# <box> x1, y1, x2, y2 </box>: four bare numbers inside box tags.
_TAGGED = re.compile(rf"<box>\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*</box>", re.IGNORECASE)

_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")
_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box", "bounding_box", "coordinates")
_LABEL_KEYS = ("label", "name", "finding", "disease", "category", "class")
_LENIENT_BOX = re.compile(
    rf'"(?:{"|".join(_BOX_KEYS)})"\s*:\s*\[\s*({_NUM}){_SEP}({_NUM}){_SEP}({_NUM}){_SEP}({_NUM})\s*\]'
)
_LENIENT_LABEL = re.compile(rf'"(?:{"|".join(_LABEL_KEYS)})"\s*:\s*"((?:[^"\\]|\\.)*)"')

_MARKUP = re.compile(r"<\|[^|>]*\|>|</?(?:box|ref|answer|think|quad)>", re.IGNORECASE)
_LABEL_NOISE = " \t\r\n:;,.-*#>\"'`[](){}="
_LIST_MARKER = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")
MAX_LABEL_CHARS = 200


def extract_boxes(text: str) -> list[RawBox]:
    """Every box in the text, in order, in any syntax MedMO or Qwen-VL is known to write. Never raises."""
    body = strip_wrappers(text)
    from_json = _boxes_from_json_objects(body)
    return from_json if from_json else _inline_boxes(body)


def _boxes_from_json_objects(text: str) -> list[RawBox]:
    """Qwen3-VL's [{"bbox_2d": [...], "label": ...}] and MedMO's {"detections": [...]}.

    Each flat {...} object is read on its own, so a list cut off mid-way by max_new_tokens still yields
    the objects that were completed.
    """
    boxes: list[RawBox] = []
    for match in _FLAT_OBJECT.finditer(text):
        chunk = match.group(0)
        try:
            parsed = json.loads(chunk)
        except ValueError:
            boxes.extend(_lenient_object(chunk))
            continue
        if isinstance(parsed, dict):
            boxes.extend(_object_boxes(parsed))
    return boxes


def _object_boxes(obj: dict[str, Any]) -> list[RawBox]:
    label = next((obj[key] for key in _LABEL_KEYS if isinstance(obj.get(key), str)), None)
    value = next((obj[key] for key in _BOX_KEYS if key in obj), None)
    if not isinstance(value, list):
        return []
    candidates = value if value and all(isinstance(v, list) for v in value) else [value]
    boxes = []
    for candidate in candidates:
        if len(candidate) == 4 and all(_is_number(v) for v in candidate):
            x1, y1, x2, y2 = (_to_float(v) for v in candidate)
            boxes.append(RawBox(_clean_label(label), (x1, y1, x2, y2)))
    return boxes


def _lenient_object(chunk: str) -> list[RawBox]:
    box = _LENIENT_BOX.search(chunk)
    if box is None:
        return []
    label = _LENIENT_LABEL.search(chunk)
    x1, y1, x2, y2 = (float(v) for v in box.groups())
    return [RawBox(_clean_label(label.group(1) if label else None), (x1, y1, x2, y2))]


def _inline_boxes(text: str) -> list[RawBox]:
    """Boxes written in the prose: `Label: [x1, y1, x2, y2]`, `Label <box>[[...], [...]]</box>`, ...

    A box's label is the text before it on its line; a box with nothing before it but separators (the
    second box of `Fractures <box>[[...], [...]]</box>`) takes the label of the box before it.
    """
    spans: list[tuple[int, int, tuple[str, ...]]] = []
    for pattern in (_POINT_PAIR, _TAGGED, _BRACKETED):
        for match in pattern.finditer(text):
            if not any(match.start() < end and start < match.end() for start, end, _ in spans):
                spans.append((match.start(), match.end(), match.groups()))
    spans.sort()
    boxes: list[RawBox] = []
    previous_end = 0
    label: str | None = None
    for start, end, numbers in spans:
        before = text[previous_end:start]
        here = _clean_label(before.splitlines()[-1] if before.strip() else "")
        if here is not None or "\n" in before:
            label = here
        x1, y1, x2, y2 = (float(v) for v in numbers)
        boxes.append(RawBox(label, (x1, y1, x2, y2)))
        previous_end = end
    return boxes


def _clean_label(raw: str | None) -> str | None:
    if raw is None:
        return None
    label = _MARKUP.sub(" ", raw).strip(_LABEL_NOISE)
    label = _LIST_MARKER.sub("", label).strip(_LABEL_NOISE)
    label = " ".join(label.split())[:MAX_LABEL_CHARS]
    return label or None


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer too long for a float: no image is that large
        return math.inf


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- mapping boxes onto the upload ---


def normalize_box(
    coords: tuple[float, float, float, float],
    convention: BoxConvention,
    model_input_size: tuple[int, int],
) -> Box | None:
    """Corners as fractions of the image: ordered, clamped to [0, 1]; None if no area is left."""
    if convention == "pixel":
        scale_x, scale_y = float(model_input_size[0]), float(model_input_size[1])
    else:
        scale_x = scale_y = 1000.0
    x1, y1, x2, y2 = coords
    if not all(math.isfinite(v) for v in coords) or scale_x <= 0 or scale_y <= 0:
        return None
    xs = sorted(_clamp(v / scale_x) for v in (x1, x2))
    ys = sorted(_clamp(v / scale_y) for v in (y1, y2))
    if not (xs[0] < xs[1] and ys[0] < ys[1]):
        return None
    return Box(x_min=xs[0], y_min=ys[0], x_max=xs[1], y_max=ys[1])


def parse_findings(
    text: str,
    convention: BoxConvention,
    model_input_size: tuple[int, int],
    image_size: tuple[int, int],
) -> list[GroundedFinding]:
    """The model's boxes as fractions of the upload and in its pixels. Drops what cannot be a box."""
    width, height = image_size
    findings = []
    for raw in extract_boxes(text):
        box = normalize_box(raw.coords, convention, model_input_size)
        if box is None:
            continue
        in_pixels = Box(
            x_min=box.x_min * width,
            y_min=box.y_min * height,
            x_max=box.x_max * width,
            y_max=box.y_max * height,
        )
        findings.append(GroundedFinding(label=raw.label, box=box, box_px=in_pixels))
    return findings


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


class Grounding(Task[GroundFields, list[GroundedFinding]]):
    name = "ground"
    summary = "Find and box abnormalities (or a named target) in an image"
    fields = GroundFields
    response = GroundResponse
    default_max_new_tokens = 512
    report_title = "grounding"
    draws = True

    def prompt(self, fields: GroundFields, box_convention: BoxConvention) -> str:
        return ground_prompt(fields, box_convention)

    def parse(self, text: str, reading: Reading) -> list[GroundedFinding]:
        return parse_findings(text, reading.box_convention, reading.model_input_size, reading.image_size)

    def answer(self, parsed: list[GroundedFinding], text: str, reading: Reading) -> dict[str, Any]:
        return {"findings": parsed, "box_convention": reading.box_convention, "raw_text": text}

    def report_content(
        self, fields: GroundFields, parsed: list[GroundedFinding], source: DicomSource
    ) -> Sequence[hd.sr.ContentItem]:
        entries = [
            boxed_finding(
                source,
                finding.label or fields.target or UNLABELLED,
                (finding.box_px.x_min, finding.box_px.y_min, finding.box_px.x_max, finding.box_px.y_max),
            )
            for finding in parsed
        ]
        return [container_item(codes.DCM.Findings, entries)]

    def annotations(self, parsed: list[GroundedFinding]) -> Sequence[Annotation]:
        return [
            Annotation(
                finding.label,
                (finding.box_px.x_min, finding.box_px.y_min, finding.box_px.x_max, finding.box_px.y_max),
            )
            for finding in parsed
        ]


GROUND = Grounding()
