"""What flows through an engine: a request prepared for the model, and the generation that comes back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int  # this request's limit
    # Requests of one group may share a whole-batch generate() call; the continuous engine ignores it.
    # The service groups by task, so a short answer never waits for a long report in that engine.
    group: str = ""


@dataclass(frozen=True)
class PreparedRequest:
    """One request as the model takes it: processor output with a batch dimension of one."""

    features: Mapping[str, torch.Tensor]
    # (width, height) of each picture the model actually sees, in the order it sees them; none for text.
    model_input_sizes: tuple[tuple[int, int], ...]
    options: GenerationOptions
    # Qwen3-VL's multimodal rope: (3, prompt_tokens) positions for the prompt, and the offset that text
    # positions carry after it (generated token n sits at prompt_tokens + n + rope_delta).
    rope_positions: torch.Tensor
    rope_delta: int

    @property
    def prompt_tokens(self) -> int:
        return int(self.features["input_ids"].shape[1])

    @property
    def model_input_size(self) -> tuple[int, int]:
        """The size the first (often the only) picture is fed at."""
        return self.model_input_sizes[0]

    def limited_to(self, max_new_tokens: int) -> PreparedRequest:
        return replace(self, options=replace(self.options, max_new_tokens=max_new_tokens))


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, the end-of-turn token included when one ended it
    prompt_tokens: int
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
