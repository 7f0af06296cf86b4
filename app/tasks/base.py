"""What a task is: everything about one way of asking MedMO, declared in one place.

A task names its route, its request fields and response model, the prompt MedMO was trained with, the
parser for what MedMO writes back, its default token limit (the setting MEDMO_<NAME>_MAX_NEW_TOKENS is made
from it), and what its answer says in a DICOM Structured Report. Routes, the OpenAPI schema, /info, the
settings and the report writer read these declarations; a new task is one new module and a line in
`app/tasks/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import highdicom as hd

from app.imaging import DicomSource
from app.outputs.overlay import Annotation
from app.schemas import BoxConvention, TaskFields, TaskResponse

FieldsT = TypeVar("FieldsT", bound=TaskFields)
ParsedT = TypeVar("ParsedT")


@dataclass(frozen=True)
class Reading:
    """What reading an answer needs besides its text: how boxes are written, and the two image sizes."""

    box_convention: BoxConvention
    model_input_size: tuple[int, int]  # (width, height) of the picture the model saw
    image_size: tuple[int, int]  # (width, height) of the upload, as displayed


class Task(ABC, Generic[FieldsT, ParsedT]):
    name: ClassVar[str]  # the route (/name), the operation id, and the setting's prefix
    summary: ClassVar[str]
    fields: type[FieldsT]
    response: type[TaskResponse]
    default_max_new_tokens: ClassVar[int]
    report_title: ClassVar[str]  # in the Structured Report's series description
    draws: ClassVar[bool] = False  # whether `annotations` gives boxes: a picture, a presentation state

    @abstractmethod
    def prompt(self, fields: FieldsT, box_convention: BoxConvention) -> str:
        """The text MedMO is given after the image."""

    @abstractmethod
    def parse(self, text: str, reading: Reading) -> ParsedT:
        """What the model wrote, read for this task. Never raises: model output is messy."""

    @abstractmethod
    def answer(self, parsed: ParsedT, text: str, reading: Reading) -> dict[str, Any]:
        """The task's own fields of the response, beside the envelope every task shares."""

    @abstractmethod
    def report_content(
        self, fields: FieldsT, parsed: ParsedT, source: DicomSource
    ) -> Sequence[hd.sr.ContentItem]:
        """The answer as Structured Report content (`app/outputs/dicom_sr.py` has the building blocks)."""

    def annotations(self, parsed: ParsedT) -> Sequence[Annotation] | None:
        """Boxes to draw on the image (a picture, a presentation state); tasks that draw set `draws`."""
        return None
