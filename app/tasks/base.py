"""What a task is: everything about one way of asking MedMO, declared in one place.

A task names its route, its request fields and response model, the prompt MedMO was trained with, how a
request's images are put to the model (one query showing them all, by default), the parser for what MedMO
writes back, its default token limit (the setting MEDMO_<NAME>_MAX_NEW_TOKENS is made from it), what its
answer is as results a hospital's standards carry (`results`: a TID 1500 report, a FHIR bundle), and what
it says in a TID 2000 Structured Report. Routes, the OpenAPI schema, /info, the settings and the report
writer read these declarations; a new task is one new module and a line in `app/tasks/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import highdicom as hd

from app.conversation import Captioned, Conversation, Query
from app.imaging import DicomSource
from app.outputs.overlay import Annotation
from app.outputs.results import Results
from app.schemas import BoxConvention, TaskFields, TaskResponse

FieldsT = TypeVar("FieldsT", bound=TaskFields)
ParsedT = TypeVar("ParsedT")


@dataclass(frozen=True)
class Reading:
    """What reading one query's answer needs besides its text: how boxes are written, and the image the
    query shows first (for grounding, the only one): its index in the request, the two sizes, its DICOM
    identity."""

    box_convention: BoxConvention
    model_input_size: tuple[int, int]  # (width, height) of the picture the model saw
    image_size: tuple[int, int]  # (width, height) of the upload, as displayed
    image_index: int = 0  # in the request, as sent
    sop_instance_uid: str | None = None
    frame: int | None = None


class Task(ABC, Generic[FieldsT, ParsedT]):
    name: ClassVar[str]  # the route (/name), the operation id, and the setting's prefix
    summary: ClassVar[str]
    fields: type[FieldsT]
    response: type[TaskResponse]
    default_max_new_tokens: ClassVar[int]
    # What MEDMO_<NAME>_MAX_NEW_TOKENS bounds, for the setting's description.
    limit_means: ClassVar[str] = "Generation limit for /{name}; a request may ask for fewer tokens."
    report_title: ClassVar[str]  # in the Structured Report's series description
    draws: ClassVar[bool] = False  # whether `annotations` gives boxes: a picture, a presentation state

    @abstractmethod
    def prompt(self, fields: FieldsT, box_convention: BoxConvention, images: int = 1) -> str:
        """The text MedMO is given after the `images` images."""

    def queries(
        self,
        fields: FieldsT,
        images: Sequence[Captioned],
        order: Sequence[int],
        box_convention: BoxConvention,
    ) -> list[Query]:
        """What the model is asked about `images` (as sent), shown in `order`: by default one query showing
        them all, each after its label, then the prompt."""
        shown = [images[index] for index in order]
        prompt = self.prompt(fields, box_convention, len(shown))
        return [Query(Conversation.asking(shown, prompt), tuple(order))]

    @abstractmethod
    def parse(self, text: str, reading: Reading) -> ParsedT:
        """What the model wrote for one query, read for this task. Never raises: model output is messy."""

    def combine(self, parsed: Sequence[ParsedT]) -> ParsedT:
        """One answer from every query's, in the order of the queries; a task of one query has one."""
        (only,) = parsed
        return only

    @abstractmethod
    def answer(self, parsed: ParsedT, texts: Sequence[str], box_convention: BoxConvention) -> dict[str, Any]:
        """The task's own fields of the response, beside the envelope every task shares; `texts` are what
        the model wrote for each query."""

    @abstractmethod
    def results(self, fields: FieldsT, parsed: ParsedT, texts: Sequence[str]) -> Results:
        """The answer as texts, regions and scores (`app/outputs/results.py`): what the TID 1500 measurement
        report and the FHIR bundle are written from. Regions index the request's images as sent, in pixels
        of each image as uploaded; `texts` are what the model wrote for each query."""

    @abstractmethod
    def report_content(
        self, fields: FieldsT, parsed: ParsedT, sources: Sequence[DicomSource]
    ) -> Sequence[hd.sr.ContentItem]:
        """The answer as Structured Report content about `sources` (the request's images, as sent), built
        from `app/outputs/dicom_sr.py`'s blocks."""

    def annotations(self, parsed: ParsedT) -> Sequence[Annotation] | None:
        """Boxes to draw on the images (a picture, a presentation state); tasks that draw set `draws`."""
        return None
