"""Clean-up shared by the parsers: reasoning and answer wrappers some checkpoints emit."""

from __future__ import annotations

import re

_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL | re.IGNORECASE)
_ANSWER_TAG = re.compile(r"</?answer>", re.IGNORECASE)


def strip_wrappers(text: str) -> str:
    """Drop <think>...</think> reasoning (GRPO-trained checkpoints may emit it) and <answer> tags."""
    return _ANSWER_TAG.sub("", _THINK.sub("", text)).strip()
