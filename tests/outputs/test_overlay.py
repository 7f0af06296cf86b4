"""Findings drawn on the picture: where the pixels change, and where they must not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from app.outputs.overlay import Annotation, Style, draw, layout
from tests.conftest import rgb_image

SIZE = (1000, 800)
BOXES = [
    Annotation("Nodule", (100, 120, 300, 260)),
    Annotation("Effusion", (600, 500, 900, 700)),
]


def changed(before: Image.Image, after: Image.Image) -> np.ndarray:
    return np.any(np.asarray(before.convert("RGB")) != np.asarray(after), axis=2)


def test_the_overlay_has_the_upload_size_and_changes_the_box_borders() -> None:
    picture = rgb_image(*SIZE)
    drawn = draw(picture, BOXES)
    assert drawn.size == picture.size
    mask = changed(picture, drawn)
    for box in BOXES:
        x_min, y_min, x_max, y_max = (int(v) for v in box.corners)
        middle_x, middle_y = (x_min + x_max) // 2, (y_min + y_max) // 2
        assert mask[y_max, middle_x]  # the lower edge
        assert mask[middle_y, x_min]  # the left edge
        assert mask[middle_y, x_max]  # the right edge
        assert not mask[middle_y, middle_x]  # the inside is the picture


def test_nothing_changes_far_from_the_boxes_and_their_labels() -> None:
    picture = rgb_image(*SIZE)
    mask = changed(picture, draw(picture, BOXES))
    allowed = np.zeros_like(mask)
    line = Style.for_size(*SIZE).line_width
    for placed in layout(SIZE, BOXES):
        x_min, y_min, x_max, y_max = placed.box
        allowed[max(0, y_min - line) : y_max + line + 1, max(0, x_min - line) : x_max + line + 1] = True
        lx0, ly0, lx1, ly1 = placed.label
        allowed[ly0 : ly1 + 1, lx0 : lx1 + 1] = True
    assert mask.any()
    assert not (mask & ~allowed).any()


@pytest.mark.parametrize(
    "corners",
    [(0, 0, 120, 90), (880, 0, 999, 90), (0, 700, 120, 799), (880, 700, 999, 799), (400, 0, 999, 40)],
    ids=["top-left", "top-right", "bottom-left", "bottom-right", "wide-at-top"],
)
def test_labels_stay_whole_inside_the_picture_on_every_edge(corners: tuple[int, int, int, int]) -> None:
    annotation = Annotation("Pneumothorax, right apical", corners)
    (placed,) = layout(SIZE, [annotation])
    x0, y0, x1, y1 = placed.label
    assert 0 <= x0 < x1 <= SIZE[0]
    assert 0 <= y0 < y1 <= SIZE[1]
    picture = rgb_image(*SIZE)
    mask = changed(picture, draw(picture, [annotation]))
    assert mask[y0:y1, x0:x1].mean() > 0.5  # the label's background is there, not clipped away


def test_line_width_and_type_grow_with_the_image() -> None:
    small, large = Style.for_size(256, 256), Style.for_size(3000, 2500)
    assert small.line_width < large.line_width
    assert small.font_size < large.font_size


def test_each_finding_has_its_own_colour() -> None:
    placed = layout(SIZE, [Annotation(str(n), (10 * n, 10 * n, 10 * n + 50, 10 * n + 50)) for n in range(5)])
    assert len({p.colour for p in placed}) == 5
