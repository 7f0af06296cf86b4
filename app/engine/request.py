"""What flows through an engine: a request prepared for the model, and the generation that comes back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length"]

# Most alternatives a request may ask to see beside each chosen token (OpenAI's bound for top_logprobs).
MAX_TOP_LOGPROBS = 20


class Priority(StrEnum):
    """How soon a request should be served, as a worklist ranks studies (the DICOM priorities' words)."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Priority.STAT: 0, Priority.URGENT: 1, Priority.ROUTINE: 2}


def precedence(priority: Priority, waited_s: float, aging_s: float) -> float:
    """Which waiting request goes first: the lowest. A request climbs one priority for every `aging_s`
    seconds it has waited, so a steady stream of stat work never starves routine work."""
    return priority.rank - waited_s / aging_s


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen. The default is greedy: the most likely token, as `generate()` picks it.

    A sampled token is drawn from the softmax of the logits divided by `temperature`, after the tokens
    outside the `top_k` most likely and outside the smallest set holding `top_p` of the probability are
    removed. The draw is a function of (seed, the token's position in the answer) alone, so a seeded
    request writes the same text whatever it is batched with.
    """

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no bound
    repetition_penalty: float = 1.0  # as transformers applies it: over the prompt's and the answer's tokens
    seed: int = 0  # drawn by the service when the client gives none

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


class TokenMatcher(Protocol):
    """Where a constrained answer stands in its grammar: which tokens may come next, and what came."""

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of an int32 bitmask (bit t%32 of word t//32)."""
        ...

    def accept(self, token: int) -> None:
        """Advance past a token the mask allowed."""
        ...


class Constrained(Protocol):
    """A compiled constraint (a grammar): each request decoding under it gets a matcher of its own."""

    def matcher(self) -> TokenMatcher: ...


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int  # this request's limit
    # Requests of one group may share a whole-batch generate() call; the continuous engine ignores it.
    # The service groups by task, so a short answer never waits for a long report in that engine.
    group: str = ""
    sampling: Sampling = GREEDY
    constraint: Constrained | None = field(default=None, compare=False)
    # Log-probabilities to return: None for none, 0 for each chosen token's, k for the k most likely too.
    logprobs: int | None = None
    # Score these continuations (token ids) as the answer, instead of generating one (`Generation.scores`).
    continuations: tuple[tuple[int, ...], ...] | None = None
    priority: Priority = Priority.ROUTINE


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
class TokenLogprobs:
    """One generated token's log-probability under the model (its raw softmax, before temperature, penalty
    and constraint), and the most likely tokens at that step with theirs, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, the end-of-turn token included when one ended it
    prompt_tokens: int
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprobs, ...] | None = None  # one per token, when asked for
    # For a scoring request: each continuation's summed log-probability as the answer, in the order asked.
    scores: tuple[float, ...] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
