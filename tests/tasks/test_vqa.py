from __future__ import annotations

from app.schemas import VqaFields
from app.tasks.vqa import parse_answer, vqa_prompt


def test_the_question_is_the_prompt() -> None:
    assert vqa_prompt(VqaFields(question="  Is there a fracture?  ")) == "Is there a fracture?"


def test_reasoning_and_answer_tags_are_removed() -> None:
    assert parse_answer("<think>look at the left lung</think>\n<answer>Yes.</answer>") == "Yes."
    assert parse_answer("  No.  ") == "No."
