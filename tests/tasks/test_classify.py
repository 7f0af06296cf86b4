from __future__ import annotations

import io
import json
import math
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydantic import ValidationError

from app.conversation import Captioned
from app.imaging import ImageLimits, decode_image
from app.outputs.dicom_sr import Author, structured_report
from app.schemas import MAX_LABEL_CHARS, MAX_LABELS
from app.tasks.classify import CLASSIFY, Choice, ChoiceQuery, ClassifyFields
from tests.conftest import pydicom_file, rgb_image
from tests.dicom_validator import dciodvfy_errors

LABELS = ["pneumothorax", "pleural effusion", "normal"]


def test_the_default_prompt_asks_which_label_and_lists_them_in_order() -> None:
    fields = ClassifyFields(labels=LABELS)
    assert CLASSIFY.prompt(fields, "pixel") == (
        "Which of the following best describes this image? "
        "Options: pneumothorax, pleural effusion, normal. Answer with one option."
    )
    assert CLASSIFY.prompt(fields, "pixel", images=2).startswith(
        "Which of the following best describes these images?"
    )
    asked = ClassifyFields(labels=LABELS, question="What does this chest X-ray show?")
    assert CLASSIFY.prompt(asked, "pixel").startswith(
        "What does this chest X-ray show? Options: pneumothorax"
    )


def test_one_query_shows_every_image_and_scores_the_labels() -> None:
    images = [Captioned(rgb_image(32, 32, seed=1), "frontal"), Captioned(rgb_image(32, 32, seed=2))]
    (query,) = CLASSIFY.queries(ClassifyFields(labels=LABELS), images, [1, 0], "pixel")
    assert isinstance(query, ChoiceQuery)
    assert query.answers == tuple(LABELS)
    assert query.images == (1, 0)
    assert len(query.conversation.pictures) == 2


def test_probabilities_are_the_softmax_of_the_logprobs_and_keep_the_order() -> None:
    choice = Choice(("a", "b", "c"), (-1.0, -0.5, -3.0))
    scored = choice.scored()
    assert [item.label for item in scored] == ["a", "b", "c"]
    assert [item.logprob for item in scored] == [-1.0, -0.5, -3.0]
    total = math.exp(-1.0) + math.exp(-0.5) + math.exp(-3.0)
    assert [item.probability for item in scored] == pytest.approx(
        [math.exp(-1.0) / total, math.exp(-0.5) / total, math.exp(-3.0) / total], abs=1e-12
    )
    assert math.fsum(item.probability for item in scored) == pytest.approx(1.0, abs=1e-12)
    assert choice.top().label == "b"
    assert choice.top().probability == scored[1].probability


def test_very_unlikely_labels_still_make_probabilities() -> None:
    # Summed log-probabilities of long labels go far below what exp() of them can hold.
    choice = Choice(("long", "longer"), (-2000.0, -2001.0))
    assert choice.probabilities == pytest.approx((1 / (1 + math.exp(-1)), 1 / (1 + math.e)))


def test_labels_are_trimmed_and_a_form_field_holds_them_as_a_json_array() -> None:
    fields = ClassifyFields.model_validate({"labels": json.dumps([" yes ", "no"])})
    assert fields.labels == ["yes", "no"]
    assert ClassifyFields.model_validate({"labels": ["yes", "no"]}, strict=True).labels == ["yes", "no"]


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (["yes"], "labels: List should have at least 2 items"),
        ([f"label {n}" for n in range(MAX_LABELS + 1)], f"at most {MAX_LABELS} items"),
        (["yes", "  "], "labels.1: String should have at least 1 character"),
        (["yes", "n" * (MAX_LABEL_CHARS + 1)], f"labels.1: String should have at most {MAX_LABEL_CHARS}"),
        (["yes", " yes"], "labels: Value error, each must differ from the others"),
        ("yes, no", "labels: Value error, must be a JSON array of strings"),
        ('{"yes": 1}', "labels: Input should be a valid list"),
        (["yes", 3], "labels.1: Input should be a valid string"),
    ],
)
def test_bad_labels_are_refused_naming_the_field(labels: object, says: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ClassifyFields.model_validate({"labels": labels})
    described = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in refused.value.errors()
    )
    assert says in described


def test_the_structured_report_holds_each_label_with_its_probability_and_is_valid_dicom(
    tmp_path: Path,
) -> None:
    decoded = decode_image(pydicom_file("CT_small.dcm"), ImageLimits(1 << 24, 1 << 24, 1))
    assert decoded.dicom is not None
    choice = Choice(tuple(LABELS), (-0.2, -2.0, -3.5))
    fields = ClassifyFields(labels=LABELS)
    content = CLASSIFY.report_content(fields, choice, [decoded.dicom])
    document = structured_report(
        [decoded.dicom], Author("MBZUAI/MedMO-8B-Next", None), content, "classification"
    )

    assert dciodvfy_errors(document, tmp_path) == []
    report = pydicom.dcmread(io.BytesIO(document))
    (request,) = [
        item for item in report.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121062"
    ]
    assert request.TextValue == CLASSIFY.prompt(fields, "pixel")
    findings = hd.sr.utils.find_content_items(
        report, name=pydicom.sr.codedict.codes.DCM.Finding, recursive=True
    )
    assert [finding.TextValue for finding in findings] == LABELS
    for finding, probability in zip(findings, choice.probabilities, strict=True):
        (score,) = finding.ContentSequence
        assert score.RelationshipType == "HAS PROPERTIES"
        assert score.ConceptNameCodeSequence[0].CodeMeaning == "Probability"
        measured = score.MeasuredValueSequence[0]
        assert float(measured.NumericValue) == pytest.approx(probability, abs=1e-6)
        assert measured.MeasurementUnitsCodeSequence[0].CodeValue == "{ratio}"
