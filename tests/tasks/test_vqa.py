from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.conversation import Captioned
from app.tasks.base import Reading
from app.tasks.classify import Choice, ChoiceQuery
from app.tasks.vqa import VQA, VqaFields
from tests.conftest import rgb_image

READING = Reading("pixel", (256, 256), (512, 512))


def test_the_question_is_the_prompt() -> None:
    assert VQA.prompt(VqaFields(question="  Is there a fracture?  "), "pixel") == "Is there a fracture?"


def test_reasoning_and_answer_tags_are_removed() -> None:
    assert VQA.parse("<think>look at the left lung</think>\n<answer>Yes.</answer>", READING) == "Yes."
    assert VQA.parse("  No.  ", READING) == "No."


def test_choices_are_listed_after_the_question_and_scored_in_one_query() -> None:
    fields = VqaFields(question="Is there a fracture?", choices=["yes", "no"])
    assert VQA.prompt(fields, "pixel") == "Is there a fracture? Options: yes, no. Answer with one option."
    (query,) = VQA.queries(fields, [Captioned(rgb_image(32, 32))], [0], "pixel")
    assert isinstance(query, ChoiceQuery)
    assert query.answers == ("yes", "no")


def test_without_choices_the_answer_is_generated() -> None:
    (query,) = VQA.queries(VqaFields(question="Any fracture?"), [Captioned(rgb_image(32, 32))], [0], "pixel")
    assert not isinstance(query, ChoiceQuery)
    assert VQA.answer("No.", ["No."], "pixel") == {"answer": "No."}


def test_the_answer_is_exactly_the_most_probable_choice() -> None:
    answer = VQA.answer(Choice(("yes", "no"), (-2.0, -0.1)), [""], "pixel")
    assert answer["answer"] == "no"
    assert [choice.label for choice in answer["choices"]] == ["yes", "no"]
    assert sum(choice.probability for choice in answer["choices"]) == pytest.approx(1.0)


def test_choices_have_the_bounds_of_labels() -> None:
    with pytest.raises(ValidationError, match="choices"):
        VqaFields(question="q", choices=["only one"])
