from __future__ import annotations

from app.tasks.base import Reading
from app.tasks.vqa import VQA, VqaFields

READING = Reading("pixel", (256, 256), (512, 512))


def test_the_question_is_the_prompt() -> None:
    assert VQA.prompt(VqaFields(question="  Is there a fracture?  "), "pixel") == "Is there a fracture?"


def test_reasoning_and_answer_tags_are_removed() -> None:
    assert VQA.parse("<think>look at the left lung</think>\n<answer>Yes.</answer>", READING) == "Yes."
    assert VQA.parse("  No.  ", READING) == "No."
