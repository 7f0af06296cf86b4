"""Diagnostic classification: how probable the model makes each of the labels a client gives.

Free text cannot be relied on by a program; a probability per label can. The model is asked the question
with the labels listed, and each label is scored, not generated: its log-probability is the model's
probability of answering exactly that label and ending its answer (the label's tokens as the model would
write them, then the end of the turn), computed in one pass over the prompt (`app.engine.scoring`). The
labels' probabilities are the softmax of those log-probabilities, so they add up to 1 over the labels given.

MedMO lists diagnostic classification among its capabilities but documents no prompt for it, so the prompt
is a plain question listing the options. /vqa with `choices` answers the same way (`ChoiceQuery`, `Choice`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import highdicom as hd
from pydantic import Field
from pydicom.sr.codedict import codes

from app.conversation import Captioned, Conversation, Query
from app.imaging import DicomSource
from app.outputs.dicom_sr import container_item, scored_finding, text_item
from app.outputs.results import Results, Score
from app.schemas import (
    LABELS_BOUNDS,
    BoxConvention,
    Labels,
    ScoredLabel,
    TaskFields,
    TaskResponse,
    TopLabel,
)
from app.tasks.base import Reading, Task


@dataclass(frozen=True)
class ChoiceQuery(Query):
    """A query answered by choosing among given answers: each is scored by the model, none is generated."""

    answers: tuple[str, ...] = ()
    field: str = "labels"  # the request field the answers came in, for errors about one of them


@dataclass(frozen=True)
class Choice:
    """What the model made of the answers it was given: each one's log-probability, in the order given."""

    answers: tuple[str, ...]
    logprobs: tuple[float, ...]

    @property
    def probabilities(self) -> tuple[float, ...]:
        """The softmax of the log-probabilities: each answer's probability among those given."""
        highest = max(self.logprobs)
        weights = [math.exp(logprob - highest) for logprob in self.logprobs]
        total = math.fsum(weights)
        return tuple(weight / total for weight in weights)

    @property
    def best(self) -> int:
        """The index of the most probable answer (the first of equals)."""
        return max(range(len(self.logprobs)), key=self.logprobs.__getitem__)

    def scored(self) -> list[ScoredLabel]:
        return [
            ScoredLabel(label=answer, probability=probability, logprob=logprob)
            for answer, probability, logprob in zip(
                self.answers, self.probabilities, self.logprobs, strict=True
            )
        ]

    def top(self) -> TopLabel:
        return TopLabel(label=self.answers[self.best], probability=self.probabilities[self.best])

    def results_scores(self) -> tuple[Score, ...]:
        """Each answer with its probability, in the order given, as the standards' writers take them."""
        return tuple(
            Score(answer, probability)
            for answer, probability in zip(self.answers, self.probabilities, strict=True)
        )

    def report_findings(self) -> list[hd.sr.ContentItem]:
        """Each answer as a finding with its probability, in the order given."""
        return [
            scored_finding(answer, probability)
            for answer, probability in zip(self.answers, self.probabilities, strict=True)
        ]


def choice_prompt(question: str, answers: Sequence[str]) -> str:
    """The question, then the answers to choose from."""
    return f"{question} Options: {', '.join(answers)}. Answer with one option."


def choice_query(
    images: Sequence[Captioned], order: Sequence[int], prompt: str, answers: Sequence[str], field: str
) -> Query:
    """One query showing `images` in `order`, then `prompt`, answered by choosing among `answers` (the
    request's `field`)."""
    shown = [images[index] for index in order]
    return ChoiceQuery(Conversation.asking(shown, prompt), tuple(order), answers=tuple(answers), field=field)


class ClassifyFields(TaskFields):
    labels: Labels = Field(
        description="The labels to choose among, each scored as the whole answer: " + LABELS_BOUNDS,
        examples=[["pneumothorax", "pleural effusion", "normal"]],
    )
    question: str | None = Field(
        None,
        min_length=1,
        max_length=4000,
        description="What to ask about the image(s); the labels are listed after it. Default: which of the "
        "labels best describes the image(s).",
        examples=["Which finding does this chest X-ray show?"],
    )


class ClassifyResponse(TaskResponse):
    task: Literal["classify"] = Field(
        "classify", description="The task that answered.", examples=["classify"]
    )
    labels: list[ScoredLabel] = Field(
        description="Every label, in the order given, with its probability (they add up to 1) and its "
        "log-probability as the model's whole answer.",
        examples=[
            [
                {"label": "pneumothorax", "probability": 0.82, "logprob": -0.31},
                {"label": "pleural effusion", "probability": 0.13, "logprob": -2.15},
                {"label": "normal", "probability": 0.05, "logprob": -3.1},
            ]
        ],
    )
    top: TopLabel = Field(
        description="The most probable label.", examples=[{"label": "pneumothorax", "probability": 0.82}]
    )


def classify_prompt(fields: ClassifyFields, images: int = 1) -> str:
    subject = "these images" if images > 1 else "this image"
    question = fields.question or f"Which of the following best describes {subject}?"
    return choice_prompt(question, fields.labels)


class Classify(Task[ClassifyFields, Choice]):
    name = "classify"
    summary = "Give the probability of each of the labels given for an image"
    fields = ClassifyFields
    response = ClassifyResponse
    # Nothing is generated: a request's token limit is its longest label's tokens (`app.api.pipeline.prepare`).
    # This default only enters the settings' context checks (MEDMO_CLASSIFY_MAX_NEW_TOKENS).
    default_max_new_tokens = 64
    limit_means = "The most tokens one label of /{name} may take (labels are scored, not generated)."
    report_title = "classification"

    def prompt(self, fields: ClassifyFields, box_convention: BoxConvention, images: int = 1) -> str:
        return classify_prompt(fields, images)

    def queries(
        self,
        fields: ClassifyFields,
        images: Sequence[Captioned],
        order: Sequence[int],
        box_convention: BoxConvention,
    ) -> list[Query]:
        prompt = self.prompt(fields, box_convention, len(order))
        return [choice_query(images, order, prompt, fields.labels, "labels")]

    def parse(self, text: str, reading: Reading) -> Choice:
        # The engine scores a ChoiceQuery's answers, and the route reads the scores (`read_answer`).
        raise TypeError("/classify chooses among its labels: there is no text to read")

    def answer(self, parsed: Choice, texts: Sequence[str], box_convention: BoxConvention) -> dict[str, Any]:
        return {"labels": parsed.scored(), "top": parsed.top()}

    def results(self, fields: ClassifyFields, parsed: Choice, texts: Sequence[str]) -> Results:
        """The labels' probabilities, and the client's question when it asked one (the default question is
        the service's wording, not a request of the client's)."""
        question = (("Question", fields.question),) if fields.question else ()
        return Results(task=self.name, texts=question, scores=parsed.results_scores())

    def report_content(
        self, fields: ClassifyFields, parsed: Choice, sources: Sequence[DicomSource]
    ) -> Sequence[hd.sr.ContentItem]:
        return [
            text_item(codes.DCM.Request, classify_prompt(fields, len(sources))),
            container_item(codes.DCM.Findings, parsed.report_findings()),
        ]


CLASSIFY = Classify()
