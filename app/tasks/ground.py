"""Grounding: ask MedMO for boxes around findings, read them back in any syntax it writes.

Coordinates are mapped back through the size of the picture the model actually saw (the processor's
resize of the upload), not the upload's size: MedMO writes absolute pixels of its input image. Base
Qwen3-VL writes a 0-1000 relative scale instead; which one applies is a setting, reported in every response.
By default the reply is decoded under a grammar of MedMO's own syntax (`box_syntax`), so that it always
parses; the parser still reads every syntax MedMO was trained on, for replies written freely.

MedMO was trained to ground on one image, and has no documented way of saying which of several images a box
is on. A request of several images is therefore grounded one image per query, each query told what the
others are (their captions) when the client captioned them; the engine runs the queries side by side, and
each finding names the image its query showed, so a box is never placed on another image.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import highdicom as hd
from pydantic import BaseModel, Field
from pydicom.sr.codedict import codes

from app.conversation import Captioned, Conversation, Query, image_label
from app.engine.grammar import MAX_BOXES_PER_FINDING, Constraint, box_constraint
from app.imaging import DicomSource
from app.outputs.dicom_sr import boxed_finding, container_item
from app.outputs.overlay import Annotation
from app.outputs.results import Region, Results
from app.schemas import BoxConvention, TaskFields, TaskResponse
from app.tasks.base import Reading, Task
from app.tasks.text import strip_wrappers

ALL_ABNORMALITIES = "any visible diseases or abnormalities"
UNLABELLED = "Unnamed finding"
# Findings a constrained reply may hold per image: more than a radiologist marks on one image, and few
# enough that a reply of that many fits the default answer limit.
MAX_FINDINGS = 8


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
    constrained: bool | None = Field(
        None,
        description="Default true: decode under MedMO's own box syntax (one finding a line: a label, then "
        "<box>[[x1, y1, x2, y2], ...]</box>, at most "
        f"{MAX_FINDINGS} lines of at most {MAX_BOXES_PER_FINDING} boxes, coordinates within the image the "
        "model sees; a line may be text alone, so that a normal study's reply is a sentence without boxes): "
        "every reply parses. false: the model writes in whichever syntax it prefers, read after the fact.",
        examples=[True],
    )


def box_syntax(convention: BoxConvention, model_input_sizes: tuple[tuple[int, int], ...]) -> Constraint:
    """The grammar of a grounding reply about one image, its coordinates bounded as the convention reads
    them: the pixels of the image the model sees, or 0-1000."""
    (size,) = model_input_sizes
    return box_constraint(size if convention == "pixel" else (1000, 1000), max_findings=MAX_FINDINGS)


class Box(BaseModel):
    x_min: float = Field(description="Left edge.", examples=[0.157])
    y_min: float = Field(description="Top edge.", examples=[0.645])
    x_max: float = Field(description="Right edge.", examples=[0.233])
    y_max: float = Field(description="Bottom edge.", examples=[0.759])


class GroundedFinding(BaseModel):
    label: str | None = Field(
        description="What the model says is there; null if it gave no name.", examples=["Fractures"]
    )
    image_index: int = Field(
        description="The image the box is on: its index in the request as sent (images[].index), 0 for the first.",
        examples=[0],
    )
    sop_instance_uid: str | None = Field(
        None,
        description="That image's SOP Instance UID when it is DICOM; null otherwise.",
        examples=["1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"],
    )
    frame: int | None = Field(
        None,
        description="That image's frame (1 for the first) when it is DICOM; null otherwise.",
        examples=[1],
    )
    box: Box = Field(
        description="Corners as fractions, 0 to 1, of its image's width and height.",
        examples=[{"x_min": 0.157, "y_min": 0.645, "x_max": 0.233, "y_max": 0.759}],
    )
    box_px: Box = Field(
        description="The same corners in its image's pixels, as displayed.",
        examples=[{"x_min": 157.3, "y_min": 516.0, "x_max": 232.9, "y_max": 607.0}],
    )


class GroundResponse(TaskResponse):
    task: Literal["ground"] = Field("ground", description="The task that answered.", examples=["ground"])
    findings: list[GroundedFinding] = Field(
        description="Every box the model drew, image by image (in the order sent), each image's in the order "
        "the model wrote them.",
        examples=[
            [
                {
                    "label": "Fractures",
                    "image_index": 0,
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
        description="The model's output exactly as written; with several images, what it wrote for each, in "
        "the order they were shown (images[].shown_as), separated by a blank line.",
        examples=["Fractures <box>[[156, 516, 231, 607]]</box>"],
    )
    dropped_boxes: int = Field(
        description="Boxes the model wrote that could not be placed on their image (no area inside it, or not "
        "numbers) and are left out of findings.",
        examples=[0],
    )


@dataclass(frozen=True)
class Grounded:
    """The findings read from what the model wrote, how many boxes could not be placed, and what it wrote
    instead of boxes about an image it boxed nothing on (a normal study's sentence): (image index, text)."""

    findings: list[GroundedFinding]
    dropped: int = 0
    remarks: tuple[tuple[int, str], ...] = ()


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
    return place_boxes(extract_boxes(text), Reading(convention, model_input_size, image_size))


def place_boxes(boxes: Sequence[RawBox], reading: Reading) -> list[GroundedFinding]:
    """Boxes on the image `reading` describes; those that cannot be placed there are left out."""
    width, height = reading.image_size
    findings = []
    for raw in boxes:
        box = normalize_box(raw.coords, reading.box_convention, reading.model_input_size)
        if box is None:
            continue
        in_pixels = Box(
            x_min=box.x_min * width,
            y_min=box.y_min * height,
            x_max=box.x_max * width,
            y_max=box.y_max * height,
        )
        findings.append(
            GroundedFinding(
                label=raw.label,
                image_index=reading.image_index,
                sop_instance_uid=reading.sop_instance_uid,
                frame=reading.frame,
                box=box,
                box_px=in_pixels,
            )
        )
    return findings


def study_context(images: Sequence[Captioned], order: Sequence[int], index: int) -> str | None:
    """What a query grounding one of several images is told about the others: their captions. None when
    the client captioned none of them: the query is then exactly the single-image one."""
    if not any(image.caption for image in images):
        return None
    numbered = {image: number for number, image in enumerate(order, start=1)}

    def named(image: int) -> str:
        return image_label(numbered[image], len(order), images[image].caption).lower()

    others = ", ".join(named(other) for other in order if other != index)
    return f"This is {named(index)} of the {len(order)} images of the study; the others are {others}.\n"


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, value))


class Grounding(Task[GroundFields, Grounded]):
    name = "ground"
    summary = "Find and box abnormalities (or a named target) in an image"
    fields = GroundFields
    response = GroundResponse
    default_max_new_tokens = 512
    report_title = "grounding"
    draws = True

    def prompt(self, fields: GroundFields, box_convention: BoxConvention, images: int = 1) -> str:
        return ground_prompt(fields, box_convention)

    def queries(
        self,
        fields: GroundFields,
        images: Sequence[Captioned],
        order: Sequence[int],
        box_convention: BoxConvention,
    ) -> list[Query]:
        """One query per image (see the module's note), in the order they are shown, each written in the
        box syntax unless the client asks for free text."""
        shape = partial(box_syntax, box_convention) if fields.constrained is not False else None
        if len(order) == 1:
            return [
                replace(query, answer_shape=shape)
                for query in super().queries(fields, images, order, box_convention)
            ]
        prompt = self.prompt(fields, box_convention)
        return [
            Query(
                Conversation.asking(
                    [Captioned(images[index].picture)], prompt, context=study_context(images, order, index)
                ),
                (index,),
                answer_shape=shape,
            )
            for index in order
        ]

    def parse(self, text: str, reading: Reading) -> Grounded:
        boxes = extract_boxes(text)
        findings = place_boxes(boxes, reading)
        remark = strip_wrappers(text) if not boxes else ""
        remarks = ((reading.image_index, remark),) if remark else ()
        return Grounded(findings, dropped=len(boxes) - len(findings), remarks=remarks)

    def combine(self, parsed: Sequence[Grounded]) -> Grounded:
        findings = [finding for grounded in parsed for finding in grounded.findings]
        return Grounded(
            sorted(findings, key=lambda finding: finding.image_index),  # stable: each image's in its order
            dropped=sum(grounded.dropped for grounded in parsed),
            remarks=tuple(sorted((r for grounded in parsed for r in grounded.remarks), key=lambda r: r[0])),
        )

    def answer(self, parsed: Grounded, texts: Sequence[str], box_convention: BoxConvention) -> dict[str, Any]:
        return {
            "findings": parsed.findings,
            "box_convention": box_convention,
            "raw_text": "\n\n".join(texts),
            "dropped_boxes": parsed.dropped,
        }

    def results(self, fields: GroundFields, parsed: Grounded, texts: Sequence[str]) -> Results:
        """Each box as a region in its image's pixels; what the model wrote instead of boxes as an answer
        (naming its image when the request has several)."""
        regions = tuple(
            Region(
                label=finding.label or fields.target or UNLABELLED,
                image_index=finding.image_index,
                box_px=(
                    finding.box_px.x_min,
                    finding.box_px.y_min,
                    finding.box_px.x_max,
                    finding.box_px.y_max,
                ),
            )
            for finding in parsed.findings
        )
        several = len(texts) > 1
        answers = tuple(
            ("Answer", f"Image {index + 1}: {remark}" if several else remark)
            for index, remark in parsed.remarks
        )
        return Results(task=self.name, texts=answers, regions=regions)

    def report_content(
        self, fields: GroundFields, parsed: Grounded, sources: Sequence[DicomSource]
    ) -> Sequence[hd.sr.ContentItem]:
        entries = [
            boxed_finding(
                sources[finding.image_index],
                finding.label or fields.target or UNLABELLED,
                (finding.box_px.x_min, finding.box_px.y_min, finding.box_px.x_max, finding.box_px.y_max),
            )
            for finding in parsed.findings
        ]
        return [container_item(codes.DCM.Findings, entries)]

    def annotations(self, parsed: Grounded) -> Sequence[Annotation]:
        return [
            Annotation(
                finding.label,
                (finding.box_px.x_min, finding.box_px.y_min, finding.box_px.x_max, finding.box_px.y_max),
                image=finding.image_index,
            )
            for finding in parsed.findings
        ]


GROUND = Grounding()
