"""Visual question answering: the clinical question itself is the prompt, after the image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import highdicom as hd
from pydantic import Field
from pydicom.sr.codedict import codes

from app.imaging import DicomSource
from app.outputs.dicom_sr import container_item, text_item
from app.schemas import BoxConvention, TaskFields, TaskResponse
from app.tasks.base import Reading, Task
from app.tasks.text import strip_wrappers


class VqaFields(TaskFields):
    question: str = Field(
        min_length=1,
        max_length=4000,
        description="The clinical question about the image (or images).",
        examples=["Is there a pleural effusion?"],
    )


class VqaResponse(TaskResponse):
    task: Literal["vqa"] = Field("vqa", description="The task that answered.", examples=["vqa"])
    answer: str = Field(description="The model's answer.", examples=["Yes, a small left pleural effusion."])


class Vqa(Task[VqaFields, str]):
    name = "vqa"
    summary = "Answer a clinical question about an image"
    fields = VqaFields
    response = VqaResponse
    default_max_new_tokens = 256
    report_title = "VQA"

    def prompt(self, fields: VqaFields, box_convention: BoxConvention, images: int = 1) -> str:
        return fields.question

    def parse(self, text: str, reading: Reading) -> str:
        return strip_wrappers(text)

    def answer(self, parsed: str, texts: Sequence[str], box_convention: BoxConvention) -> dict[str, Any]:
        return {"answer": parsed}

    def report_content(
        self, fields: VqaFields, parsed: str, sources: Sequence[DicomSource]
    ) -> Sequence[hd.sr.ContentItem]:
        return [
            text_item(codes.DCM.Request, fields.question),
            container_item(codes.DCM.Findings, [text_item(codes.DCM.Finding, parsed)]),
        ]


VQA = Vqa()
