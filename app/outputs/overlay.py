"""Findings drawn on the picture: each box and its label, legible at any image size.

The picture is the upload as the service displays it (a DICOM windowed as the request asked), at the
upload's size. Line width and type size follow the image's shorter side; each label sits above its box,
or inside it when the box touches the top, and is moved left as needed so that it is always whole inside
the picture. Colours come from a palette chosen to stay distinct for colour-blind readers (Okabe and Ito).
Nothing but the model's labels is written: no patient data is burnt into the image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# Okabe-Ito: orange, sky blue, bluish green, yellow, blue, vermillion, reddish purple.
PALETTE = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
UNLABELLED = "finding"


@dataclass(frozen=True)
class Annotation:
    """A box in its picture's pixels, (x_min, y_min, x_max, y_max), and what the model called it."""

    label: str | None
    corners: tuple[float, float, float, float]
    image: int = 0  # which of the request's images (as sent) it is on


@dataclass(frozen=True)
class Style:
    line_width: int
    font_size: int
    padding: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Style:
        side = min(width, height)
        return cls(
            line_width=max(2, round(side / 300)),
            font_size=max(12, round(side / 40)),
            padding=max(2, round(side / 400)),
        )


@dataclass(frozen=True)
class Placed:
    """Where an annotation's box and label go, in whole pixels."""

    box: tuple[int, int, int, int]
    label: tuple[int, int, int, int]  # the label's background rectangle, inside the picture
    text: str
    colour: tuple[int, int, int]


def layout(size: tuple[int, int], annotations: Sequence[Annotation]) -> list[Placed]:
    """Where each box and label goes on a picture of `size` (width, height)."""
    width, height = size
    style = Style.for_size(width, height)
    font = ImageFont.load_default(size=style.font_size)
    placed = []
    for index, annotation in enumerate(annotations):
        x_min, y_min, x_max, y_max = (round(value) for value in annotation.corners)
        box = (max(0, x_min), max(0, y_min), min(width - 1, x_max), min(height - 1, y_max))
        text = annotation.label or UNLABELLED
        left, top, right, bottom = (round(value) for value in font.getbbox(text))
        label_width = min(width, right - left + 2 * style.padding)
        label_height = min(height, bottom - top + 2 * style.padding)
        x = min(box[0], width - label_width)
        y = box[1] - label_height if box[1] >= label_height else box[1] + style.line_width
        y = min(y, height - label_height)
        placed.append(
            Placed(box, (x, y, x + label_width, y + label_height), text, PALETTE[index % len(PALETTE)])
        )
    return placed


def draw(picture: Image.Image, annotations: Sequence[Annotation]) -> Image.Image:
    """A copy of the picture with the annotations drawn on it."""
    drawn = picture.convert("RGB")
    style = Style.for_size(*drawn.size)
    font = ImageFont.load_default(size=style.font_size)
    pen = ImageDraw.Draw(drawn)
    for placed in layout(drawn.size, annotations):
        pen.rectangle(placed.box, outline=placed.colour, width=style.line_width)
        pen.rectangle(placed.label, fill=placed.colour)
        ink = (0, 0, 0) if sum(placed.colour) > 380 else (255, 255, 255)
        left, top, _, _ = font.getbbox(placed.text)
        pen.text(
            (placed.label[0] + style.padding - left, placed.label[1] + style.padding - top),
            placed.text,
            fill=ink,
            font=font,
        )
    return drawn


def encode(picture: Image.Image, media_type: str) -> bytes:
    buffer = io.BytesIO()
    if media_type == "image/jpeg":
        picture.save(buffer, format="JPEG", quality=90)
    else:
        picture.save(buffer, format="PNG")
    return buffer.getvalue()
