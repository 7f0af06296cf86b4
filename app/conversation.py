"""What the model is asked: one type that every route builds and the runtime turns into the model's input.

A `Conversation` is turns of texts and pictures in order, as a chat client writes them; a task's request
is one user turn holding its captioned images, then its prompt. A `Query` is one sequence the model
generates for a request: a conversation, and which of the request's images it shows. Most requests are one
query; grounding several images asks one query per image (MedMO was trained to ground on one image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image

if TYPE_CHECKING:
    from app.engine.grammar import Constraint

Role = Literal["system", "user", "assistant"]
Part = str | Image.Image


@dataclass(frozen=True)
class Turn:
    role: Role
    parts: tuple[Part, ...]  # texts and pictures, in the order the model reads them


@dataclass(frozen=True)
class Captioned:
    """A picture of the request and what the client says it is ("frontal", "prior, 2025-03-02", ...)."""

    picture: Image.Image
    caption: str | None = None


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]

    @property
    def pictures(self) -> list[Image.Image]:
        return [part for turn in self.turns for part in turn.parts if isinstance(part, Image.Image)]

    @classmethod
    def about(cls, picture: Image.Image, prompt: str) -> Conversation:
        """One picture, then the prompt: MedMO's quick-start shape."""
        return cls.asking([Captioned(picture)], prompt)

    @classmethod
    def asking(cls, images: Sequence[Captioned], prompt: str, *, context: str | None = None) -> Conversation:
        """One user turn: `context` if any, the images each after its label, then the prompt.

        One image without a caption is MedMO's quick-start shape, image then text. With several, each is
        labelled "Image k" (and its caption), so that the prompt and the answer can name them.
        """
        parts: list[Part] = [context] if context else []
        for number, image in enumerate(images, start=1):
            label = image_label(number, len(images), image.caption)
            if label:
                parts.append(label + ": ")
            parts.append(image.picture)
        parts.append(prompt)
        return cls((Turn("user", tuple(parts)),))


def image_label(number: int, count: int, caption: str | None) -> str:
    """How the prompt names the `number`-th of `count` images: "Image 2 (lateral)", or the caption alone
    for a request's only image; empty for an only image without a caption."""
    if count == 1:
        return caption or ""
    return f"Image {number} ({caption})" if caption else f"Image {number}"


@dataclass(frozen=True)
class Query:
    """One sequence generated for a request: what the model is asked, and the request's images it shows
    (their indexes as the client sent them), in the order it shows them."""

    conversation: Conversation
    images: tuple[int, ...]
    # The language the answer must be written in, given the sizes the model sees the images at (a box
    # grammar bounds coordinates by them); None: free text.
    answer_shape: Callable[[tuple[tuple[int, int], ...]], Constraint] | None = None
