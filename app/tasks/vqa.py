"""Visual question answering: the clinical question itself is the prompt, after the image."""

from __future__ import annotations

from app.schemas import VqaFields
from app.tasks.text import strip_wrappers


def vqa_prompt(fields: VqaFields) -> str:
    return fields.question


def parse_answer(text: str) -> str:
    return strip_wrappers(text)
