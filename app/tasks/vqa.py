"""Visual question answering: the clinical question itself is the prompt, after the image.

With `choices`, the answer is chosen among them, not written: each is scored as the model's whole answer
(as /classify scores its labels), and the most probable one is the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import highdicom as hd
from pydantic import Field
from pydicom.sr.codedict import codes

from app.conversation import Captioned, Query
from app.imaging import DicomSource
from app.outputs.dicom_sr import container_item, text_item
from app.outputs.results import Results
from app.schemas import LABELS_BOUNDS, BoxConvention, Labels, ScoredLabel, TaskFields, TaskResponse
from app.tasks.base import Reading, Task
from app.tasks.classify import Choice, choice_prompt, choice_query
from app.tasks.text import strip_wrappers


class VqaFields(TaskFields):
    question: str = Field(
        min_length=1,
        max_length=4000,
        description="The clinical question about the image (or images).",
        examples=["Is there a pleural effusion?"],
    )
    choices: Labels | None = Field(
        None,
        description="The answers to choose among: the answer is then exactly the most probable of them, "
        "each scored as the model's whole answer, not free text. " + LABELS_BOUNDS,
        examples=[["yes", "no"]],
    )


class VqaResponse(TaskResponse):
    task: Literal["vqa"] = Field("vqa", description="The task that answered.", examples=["vqa"])
    answer: str = Field(description="The model's answer.", examples=["Yes, a small left pleural effusion."])
    choices: list[ScoredLabel] | None = Field(
        None,
        description="With choices: every choice, in the order given, with its probability (they add up to "
        "1) and its log-probability as the model's whole answer; null otherwise.",
        examples=[
            [
                {"label": "yes", "probability": 0.91, "logprob": -0.09},
                {"label": "no", "probability": 0.09, "logprob": -2.4},
            ]
        ],
    )


class Vqa(Task[VqaFields, str | Choice]):
    name = "vqa"
    summary = "Answer a clinical question about an image"
    fields = VqaFields
    response = VqaResponse
    default_max_new_tokens = 256
    report_title = "VQA"

    def prompt(self, fields: VqaFields, box_convention: BoxConvention, images: int = 1) -> str:
        if fields.choices:
            return choice_prompt(fields.question, fields.choices)
        return fields.question

    def queries(
        self,
        fields: VqaFields,
        images: Sequence[Captioned],
        order: Sequence[int],
        box_convention: BoxConvention,
    ) -> list[Query]:
        if not fields.choices:
            return super().queries(fields, images, order, box_convention)
        return [choice_query(images, order, self.prompt(fields, box_convention), fields.choices, "choices")]

    def parse(self, text: str, reading: Reading) -> str | Choice:
        return strip_wrappers(text)

    def answer(
        self, parsed: str | Choice, texts: Sequence[str], box_convention: BoxConvention
    ) -> dict[str, Any]:
        if isinstance(parsed, Choice):
            return {"answer": parsed.top().label, "choices": parsed.scored()}
        return {"answer": parsed}

    def results(self, fields: VqaFields, parsed: str | Choice, texts: Sequence[str]) -> Results:
        if isinstance(parsed, Choice):
            return Results(
                task=self.name,
                texts=(("Question", fields.question), ("Answer", parsed.top().label)),
                scores=parsed.results_scores(),
            )
        return Results(task=self.name, texts=(("Question", fields.question), ("Answer", parsed)))

    def report_content(
        self, fields: VqaFields, parsed: str | Choice, sources: Sequence[DicomSource]
    ) -> Sequence[hd.sr.ContentItem]:
        findings = (
            parsed.report_findings() if isinstance(parsed, Choice) else [text_item(codes.DCM.Finding, parsed)]
        )
        return [text_item(codes.DCM.Request, fields.question), container_item(codes.DCM.Findings, findings)]


VQA = Vqa()
