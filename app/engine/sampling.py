"""Choosing each next token from the model's logits, for many rows at once, each row with its own rules.

Both engines choose tokens here: the continuous engine inside its decode step (and so inside captured
graphs), the reference engine from a logits processor inside `generate()`. Every per-row rule lives in a
device tensor of `RowRules`, at a fixed address, so one captured program serves any mix of greedy, sampled,
penalised and constrained rows:

- **repetition penalty**, as transformers applies it: a logit of a token already in the prompt or the
  answer is divided by the penalty if positive, multiplied if negative;
- **the constraint's mask**: an int32 bitmask per row (bit t%32 of word t//32 allows token t), written by
  the host from the row's grammar before the step; rows without a constraint hold every bit set;
- **greedy** rows take the most likely token, exactly the argmax `generate()` takes;
- **sampled** rows divide by their temperature, keep their `top_k` most likely tokens and, of those, the
  smallest set holding `top_p` of the probability, and draw from what is left by the Gumbel-max trick with
  noise that is a hash of (seed, step, token): no generator state, so the draw is the same whatever the row
  is batched with and whichever slot it sits in, and graphs replay it without RNG bookkeeping;
- **log-probabilities** of the raw logits (before temperature, penalty and mask, as OpenAI reports them):
  the chosen token's, and the `MAX_TOP_LOGPROBS` most likely.

A step whose rows are all plain (greedy, no penalty, no mask, no log-probabilities) takes `choose_plain`,
the bare argmax: such rows pay nothing for the others' rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.engine.request import MAX_TOP_LOGPROBS, GenerationOptions, Sampling, TokenLogprobs

_MASK32 = 0xFFFFFFFF
# murmur3's 32-bit finaliser constants: every input bit moves every output bit.
_MIX_1 = 0x85EBCA6B
_MIX_2 = 0xC2B2AE35


def _times(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant modulo 2**32 for x in [0, 2**32), in int64 without overflow: two 16-bit halves."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on 32-bit values held in int64."""
    x = x ^ (x >> 16)
    x = _times(x, _MIX_1)
    x = x ^ (x >> 13)
    x = _times(x, _MIX_2)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) uniforms in (0, 1), a function of each row's (seed, step) and the token alone."""
    row = _mix(_mix(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    row = _mix(row ^ _times(steps & _MASK32, 0x9E3779B1))
    bits = _mix(row.view(-1, 1) ^ token_keys.view(1, -1))
    # The top 24 bits: exactly representable in float32, and never 0 or 1 with the half-step offset.
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def token_keys(vocabulary: int, device: torch.device) -> torch.Tensor:
    """Each token's own hash, fixed once: the per-token part of the noise."""
    return _mix(torch.arange(vocabulary, dtype=torch.int64, device=device) + 0x632BE5AB)


def bitmask_words(vocabulary: int) -> int:
    return (vocabulary + 31) // 32


def allowed_by(bitmask: torch.Tensor, words: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) booleans from (rows, words) int32 bitmasks; `words`, `bits` index each token's bit."""
    return ((bitmask[:, words] >> bits) & 1).bool()


class RowRules:
    """Each row's rules and state, as device tensors at fixed addresses (one row per slot)."""

    def __init__(self, rows: int, vocabulary: int, device: torch.device) -> None:
        self.vocabulary = vocabulary
        self.temperature = torch.ones(rows, dtype=torch.float32, device=device)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_k = torch.full((rows,), vocabulary, dtype=torch.int64, device=device)
        self.penalty = torch.ones(rows, dtype=torch.float32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.steps = torch.zeros(rows, dtype=torch.int64, device=device)  # tokens chosen so far
        self.seen = torch.zeros(rows, vocabulary, dtype=torch.bool, device=device)  # for the penalty
        self.bitmask = torch.full((rows, bitmask_words(vocabulary)), -1, dtype=torch.int32, device=device)
        # Constants of the step.
        self.keys = token_keys(vocabulary, device)
        index = torch.arange(vocabulary, device=device)
        self.words = index // 32
        self.bits = (index % 32).to(torch.int32)
        self.ranks = index
        self.rows = torch.arange(rows, device=device)
        # What the step writes besides the tokens.
        self.logprob = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_ids = torch.zeros(rows, MAX_TOP_LOGPROBS, dtype=torch.int64, device=device)
        self.top_logprobs = torch.zeros(rows, MAX_TOP_LOGPROBS, dtype=torch.float32, device=device)

    def clear(self) -> None:
        """Every row back to the plain rules (after warm-up's runs on made-up rows)."""
        self.temperature.fill_(1.0)
        self.greedy.fill_(True)
        self.top_p.fill_(1.0)
        self.top_k.fill_(self.vocabulary)
        self.penalty.fill_(1.0)
        self.seeds.zero_()
        self.steps.zero_()
        self.seen.zero_()
        self.bitmask.fill_(-1)

    def set(self, row: int, options: GenerationOptions, prompt_ids: torch.Tensor) -> None:
        """Give `row` a new request's rules; `prompt_ids` are what the penalty counts from the start."""
        sampling: Sampling = options.sampling
        self.greedy[row] = sampling.greedy
        self.temperature[row] = 1.0 if sampling.greedy else sampling.temperature
        self.top_p[row] = sampling.top_p
        self.top_k[row] = sampling.top_k if 0 < sampling.top_k < self.vocabulary else self.vocabulary
        self.penalty[row] = sampling.repetition_penalty
        self.seeds[row] = sampling.seed
        self.steps[row] = 0
        self.bitmask[row] = -1
        if sampling.repetition_penalty != 1.0:
            self.seen[row] = False
            self.seen[row, prompt_ids.to(self.seen.device)] = True

    def copy(self, source: int, target: int) -> None:
        for tensor in (
            self.temperature,
            self.greedy,
            self.top_p,
            self.top_k,
            self.penalty,
            self.seeds,
            self.steps,
            self.seen,
            self.bitmask,
        ):
            tensor[target] = tensor[source]


def samples(options: GenerationOptions) -> bool:
    return not options.sampling.greedy


def needs_rules(options: GenerationOptions) -> bool:
    """Whether a request's tokens need more than the plain argmax."""
    return (
        not options.sampling.greedy
        or options.sampling.repetition_penalty != 1.0
        or options.constraint is not None
        or options.logprobs is not None
    )


def choose(logits: torch.Tensor, rules: RowRules, first: int = 0, *, sample: bool = True) -> torch.Tensor:
    """Each row's next token by its own rules (logits row i is rules row first + i), with its
    log-probabilities written to `rules.logprob` / `top_ids` / `top_logprobs`. Static shapes throughout: a
    graph can capture it. `sample=False` when no row samples: the sort that top-p needs is skipped."""
    batch = logits.shape[0]
    end = first + batch
    raw = logits.float()
    logprobs = raw.log_softmax(-1)
    scores = raw
    # The penalty, over the tokens each row has seen (a factor of 1 leaves a row unchanged, bit for bit).
    penalty = rules.penalty[first:end].view(batch, 1)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    scores = torch.where(rules.seen[first:end], penalised, scores)
    # The constraint: a row may only take what its grammar allows.
    allowed = allowed_by(rules.bitmask[first:end], rules.words, rules.bits)
    scores = scores.masked_fill(~allowed, float("-inf"))
    greedy_tokens = scores.argmax(-1)
    tokens = (
        torch.where(rules.greedy[first:end], greedy_tokens, _sampled(scores, allowed, rules, first))
        if sample
        else greedy_tokens
    )
    # What the row has now seen, the step it is at, and the log-probabilities of what it took.
    rules.seen[rules.rows[first:end], tokens] = True
    rules.steps[first:end] += 1
    rules.logprob[first:end] = logprobs.gather(-1, tokens.view(batch, 1)).view(batch)
    top = logprobs.topk(MAX_TOP_LOGPROBS, dim=-1)
    rules.top_logprobs[first:end] = top.values
    rules.top_ids[first:end] = top.indices
    return tokens


def _sampled(scores: torch.Tensor, allowed: torch.Tensor, rules: RowRules, first: int) -> torch.Tensor:
    """Draws: temperature, then top-k and top-p over the sorted scores, then Gumbel-max."""
    batch = scores.shape[0]
    end = first + batch
    scaled = scores / rules.temperature[first:end].view(batch, 1)
    ordered, _ = scaled.sort(-1, descending=True)
    kept = rules.ranks.view(1, -1) < rules.top_k[first:end].view(batch, 1)
    probabilities = ordered.masked_fill(~kept, float("-inf")).softmax(-1)
    before = probabilities.cumsum(-1) - probabilities  # the mass of the tokens ranked above each
    top_p = rules.top_p[first:end].view(batch, 1)
    kept = kept & ((before < top_p) | (top_p >= 1.0))
    kept[:, 0] = True
    lowest = ordered.masked_fill(~kept, float("inf")).amin(-1, keepdim=True)
    candidates = (scaled >= lowest) & allowed
    noise = uniform_noise(rules.seeds[first:end], rules.steps[first:end], rules.keys)
    gumbel = -torch.log(-torch.log(noise))
    return (scaled + gumbel).masked_fill(~candidates, float("-inf")).argmax(-1)


@dataclass(frozen=True)
class Chosen:
    """What a step chose for its rows, read back on the host: a token per row, and the log-probabilities
    when the step computed them (a step with rules does; a plain step does not). A row's log-probabilities
    are made into Python values only when asked for (`logprobs_of`): most rows of a sampled step want none."""

    tokens: list[int]
    # (rows,), (rows, MAX_TOP_LOGPROBS), (rows, MAX_TOP_LOGPROBS), on the CPU.
    _logprob: torch.Tensor | None = field(default=None, compare=False)
    _top_ids: torch.Tensor | None = field(default=None, compare=False)
    _top_logprobs: torch.Tensor | None = field(default=None, compare=False)

    @classmethod
    def read(
        cls, tokens: torch.Tensor, logprob: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor
    ) -> Chosen:
        """From a step's outputs; copied, so that the buffers they were read into can be used again."""
        return cls(
            tokens=[int(token) for token in tokens.tolist()],
            _logprob=logprob.cpu().clone(),
            _top_ids=top_ids.cpu().clone(),
            _top_logprobs=top_logprobs.cpu().clone(),
        )

    def logprobs_of(self, row: int, top: int) -> TokenLogprobs | None:
        """Row `row`'s chosen token's log-probability and its `top` most likely alternatives; None when the
        step computed none."""
        if self._logprob is None or self._top_ids is None or self._top_logprobs is None:
            return None
        ids = self._top_ids[row, :top].tolist()
        values = self._top_logprobs[row, :top].tolist()
        return TokenLogprobs(float(self._logprob[row]), tuple(zip(ids, values, strict=True)))
