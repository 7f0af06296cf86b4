from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.tasks.ground import GroundFields, RawBox, extract_boxes, ground_prompt, normalize_box, parse_findings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # MedMO's README example: two boxes under one label.
        (
            "Fractures <box>[[156, 516, 231, 607], [240, 529, 296, 581]]</box>",
            [("Fractures", (156, 516, 231, 607)), ("Fractures", (240, 529, 296, 581))],
        ),
        ("Nodule: [ [10, 20, 30, 40] ]", [("Nodule", (10, 20, 30, 40))]),
        (
            "Cardiomegaly: [ 100, 120, 300, 330 ]\nPleural effusion: [ 5, 6, 70, 80 ]",
            [("Cardiomegaly", (100, 120, 300, 330)), ("Pleural effusion", (5, 6, 70, 80))],
        ),
        ("<answer>\nMass: <box> 11, 22, 33, 44 </box>\n</answer>", [("Mass", (11, 22, 33, 44))]),
        (
            "Opacity: <box> [ 1, 2, 3, 4 ] [ 5, 6, 7, 8 ] </box>",
            [("Opacity", (1, 2, 3, 4)), ("Opacity", (5, 6, 7, 8))],
        ),
        (
            '{"detections": [{"label": "nodule", "bbox": [1, 2, 3, 4]}, {"label": "mass", "bbox": [5, 6, 7, 8]}]}',
            [("nodule", (1, 2, 3, 4)), ("mass", (5, 6, 7, 8))],
        ),
        (
            '```json\n[{"bbox_2d": [12.5, 34, 56, 78], "label": "opacity"}]\n```',
            [("opacity", (12.5, 34, 56, 78))],
        ),
        (
            "<|object_ref_start|>lesion<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|>",
            [("lesion", (10, 20, 30, 40))],
        ),
        ("<ref>lesion</ref><box>(10,20),(30,40)</box>", [("lesion", (10, 20, 30, 40))]),
        # Special tokens are stripped by decoding, leaving the label glued to the points.
        ("lesion(10,20),(30,40)", [("lesion", (10, 20, 30, 40))]),
        # Cut off by max_new_tokens: the completed objects still count.
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6', [("a", (1, 2, 3, 4))]),
        # Reasoning is not searched for boxes.
        ("<think>maybe [1, 2, 3, 4]</think>Nodule: [5, 6, 7, 8]", [("Nodule", (5, 6, 7, 8))]),
        ("No abnormality detected.", []),
        ("Five [1, 2, 3, 4, 5] numbers are not a box.", []),
    ],
)
def test_extracts_every_syntax_medmo_and_qwen_write(
    text: str, expected: list[tuple[str, tuple[float, ...]]]
) -> None:
    assert [(box.label, box.coords) for box in extract_boxes(text)] == [
        (label, tuple(float(v) for v in coords)) for label, coords in expected
    ]


def test_pixel_boxes_map_through_the_model_input_size_not_the_upload_size() -> None:
    # Upload 1000x800; the model saw 992x800 (sides rounded to multiples of 32).
    findings = parse_findings(
        "Fractures <box>[[156, 516, 231, 607], [240, 529, 296, 581]]</box>", "pixel", (992, 800), (1000, 800)
    )
    first, second = findings
    assert first.label == second.label == "Fractures"
    assert first.box.x_min == pytest.approx(156 / 992)
    assert first.box.y_min == pytest.approx(516 / 800)
    assert first.box.x_max == pytest.approx(231 / 992)
    assert first.box.y_max == pytest.approx(607 / 800)
    assert first.box_px.x_min == pytest.approx(156 / 992 * 1000)
    assert first.box_px.y_max == pytest.approx(607.0)
    assert second.box_px.x_max == pytest.approx(296 / 992 * 1000)


def test_rel1000_boxes_are_read_on_a_thousand_scale() -> None:
    (finding,) = parse_findings("Nodule: [156, 516, 231, 607]", "rel1000", (992, 800), (1000, 800))
    assert (finding.box.x_min, finding.box.y_min, finding.box.x_max, finding.box.y_max) == pytest.approx(
        (0.156, 0.516, 0.231, 0.607)
    )
    assert finding.box_px.y_min == pytest.approx(412.8)


def test_swapped_corners_are_ordered_and_overshoot_is_clamped() -> None:
    box = normalize_box((300, 900, 100, -50), "pixel", (200, 800))
    assert box is not None
    assert (box.x_min, box.y_min, box.x_max, box.y_max) == (0.5, 0.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "coords",
    [(10, 10, 10, 50), (10, 10, 50, 10), (-20, -20, -5, -5), (900, 900, 1200, 1200), (float("nan"), 0, 1, 1)],
)
def test_what_cannot_be_a_box_is_dropped(coords: tuple[float, float, float, float]) -> None:
    assert normalize_box(coords, "pixel", (800, 800)) is None


def test_prompt_names_the_target_and_the_coordinate_units() -> None:
    pixel = ground_prompt(GroundFields(target="pneumothorax", modality="chest X-ray"), "pixel")
    assert "pneumothorax" in pixel
    assert "chest X-ray" in pixel
    assert "pixel values" in pixel
    default = ground_prompt(GroundFields(), "rel1000")
    assert "abnormalities" in default
    assert "0-1000" in default


box_syntaxes = st.sampled_from(
    [
        "{label}: [{a}, {b}, {c}, {d}]",
        "{label} <box>[[{a}, {b}, {c}, {d}]]</box>",
        "<box> {a}, {b}, {c}, {d} </box>",
        '{{"bbox_2d": [{a}, {b}, {c}, {d}], "label": "{label}"}}',
        "<ref>{label}</ref><box>({a},{b}),({c},{d})</box>",
    ]
)
numbers = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.integers(-(10**400), 10**400),
)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=300),
    syntax=box_syntaxes,
    label=st.text(max_size=20),
    coords=st.tuples(numbers, numbers, numbers, numbers),
    noise=st.text(max_size=50),
    convention=st.sampled_from(["pixel", "rel1000"]),
    model_size=st.tuples(st.integers(32, 4096), st.integers(32, 4096)),
    image_size=st.tuples(st.integers(1, 10000), st.integers(1, 10000)),
)
def test_parser_never_raises_and_every_box_is_inside_the_image(
    text: str,
    syntax: str,
    label: str,
    coords: tuple[float, float, float, float],
    noise: str,
    convention: str,
    model_size: tuple[int, int],
    image_size: tuple[int, int],
) -> None:
    a, b, c, d = coords
    messy = text + syntax.format(label=label, a=a, b=b, c=c, d=d) + noise
    findings = parse_findings(messy, convention, model_size, image_size)  # type: ignore[arg-type]
    width, height = image_size
    for finding in findings:
        box, px = finding.box, finding.box_px
        assert 0.0 <= box.x_min < box.x_max <= 1.0
        assert 0.0 <= box.y_min < box.y_max <= 1.0
        assert 0.0 <= px.x_min <= px.x_max <= width
        assert 0.0 <= px.y_min <= px.y_max <= height


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=2000))
def test_extraction_never_raises_on_arbitrary_text(text: str) -> None:
    for raw in extract_boxes(text):
        assert isinstance(raw, RawBox)
        assert len(raw.coords) == 4


@settings(max_examples=200, deadline=None)
@given(
    syntax=box_syntaxes,
    label=st.from_regex(r"[A-Za-z][A-Za-z ]{0,18}[A-Za-z]", fullmatch=True),
    xs=st.lists(st.integers(0, 991), min_size=2, max_size=2, unique=True),
    ys=st.lists(st.integers(0, 799), min_size=2, max_size=2, unique=True),
)
def test_a_well_formed_box_is_always_found_with_its_label(
    syntax: str, label: str, xs: list[int], ys: list[int]
) -> None:
    text = syntax.format(label=label, a=xs[0], b=ys[0], c=xs[1], d=ys[1])
    (finding,) = parse_findings(text, "pixel", (992, 800), (992, 800))
    assert finding.box_px.x_min == pytest.approx(min(xs))
    assert finding.box_px.y_max == pytest.approx(max(ys))
    if "{label}" in syntax:
        assert finding.label == " ".join(label.split())  # runs of spaces are tidied
