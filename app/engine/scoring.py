"""Scoring answers instead of writing one: the model's log-probability of each of a few given continuations.

A classifier asks how likely each label is as the whole answer. Generating cannot say that; teacher forcing
can: the log-probability of a continuation is the sum, over its tokens, of the log-softmax of the model's
next-token logits at the token before it. The prompt (with its images, the costly part) runs once and leaves
its keys and values in a cache; the cache is repeated once per continuation and every continuation runs in
one batched forward over it, so ten labels cost one prompt and one short batch, not ten requests.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, Qwen3VLForConditionalGeneration

from app.engine.request import PreparedRequest

# transformers 5 renames the forward's `past_key_values` to `cache` (the old name warns until 5.40); the
# project supports releases on either side of the rename.
_CACHE_ARGUMENT = (
    "cache"
    if "cache" in inspect.signature(Qwen3VLForConditionalGeneration.forward).parameters
    else "past_key_values"
)


def score_continuations(
    model: Any, request: PreparedRequest, continuations: Sequence[Sequence[int]]
) -> tuple[float, ...]:
    """Each continuation's summed log-probability as the answer to `request`, in the order given.

    `model` is a Qwen3-VL model (the project's slot attention may be registered on it: without its
    argument it is plain SDPA). Continuations are token ids, each non-empty; they may differ in length.
    """
    if not continuations:
        return ()
    if any(len(continuation) == 0 for continuation in continuations):
        raise ValueError("every continuation needs at least one token")
    device = model.device
    lengths = torch.tensor([len(continuation) for continuation in continuations], device=device)
    longest = int(lengths.max())
    # Right padding (with any valid id: the row's last token): every real token precedes its row's padding,
    # so causal attention keeps the padding out of every real token's view, and the padded positions'
    # scores are dropped below.
    padded = [[*row, *[row[-1]] * (longest - len(row))] for row in continuations]
    tokens = torch.tensor(padded, device=device)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config.text_config)
        features = request.features
        prompt = model(
            input_ids=features["input_ids"].to(device),
            pixel_values=_on(features.get("pixel_values"), device),
            image_grid_thw=_on(features.get("image_grid_thw"), device),
            position_ids=request.rope_positions.unsqueeze(1).to(device),
            use_cache=True,
            logits_to_keep=1,
            **{_CACHE_ARGUMENT: cache},
        )
        # The prompt's last position predicts every continuation's first token.
        last = prompt.logits[0, -1].float()
        scores = last[tokens[:, 0]] - torch.logsumexp(last, dim=-1)
        if longest > 1:
            # Each token but the last predicts the next; the last one predicts nothing asked about.
            inputs = tokens[:, :-1]
            cache.batch_repeat_interleave(len(continuations))
            # Text after the prompt sits at prompt_tokens + i + rope_delta on all three rope axes.
            offsets = torch.arange(longest - 1, device=device) + request.prompt_tokens + request.rope_delta
            continued = model(
                input_ids=inputs,
                position_ids=offsets.view(1, 1, -1).expand(3, len(continuations), -1),
                use_cache=True,
                **{_CACHE_ARGUMENT: cache},
            )
            following = _token_logprobs(continued.logits, tokens[:, 1:])
            real = torch.arange(1, longest, device=device).view(1, -1) < lengths.view(-1, 1)
            scores = scores + torch.where(real, following, 0.0).sum(dim=1)
    return tuple(float(score) for score in scores.tolist())


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32, for logits (..., vocabulary) and targets (...)."""
    logits = logits.float()
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
