"""The device side of the continuous engine: a KV cache of slots, and the model's forward over them.

Each running request owns one slot, a row of a cache preallocated for `slots` requests of up to `context`
tokens, with its own length and its own multimodal rope offset (Qwen3-VL's `rope_delta`). The model is
transformers' own; what changes is where its attention reads and writes. An attention function registered
with transformers (`AttentionInterface`) and selected for the text model only does that:

- **prefill** runs several new requests packed into one forward (the vision tower and every projection see
  them together): each request attends causally to itself alone, exactly as it would alone, and its keys and
  values land in its slot;
- **decode** runs one token for the first `batch` slots: each row writes its new key and value at its own
  length, and attends to its own length only, through a mask over a span rounded up to a few buckets.

Running requests always occupy slots 0..n-1: a request that finishes hands its slot to the last one (a copy
of that row's filled length), so a decode step never gathers rows. On CUDA and ROCm each (batch, span)
bucket's decode step is compiled (torch.compile, fullgraph: fused kernels, fewer launches) and captured once
as a graph at startup, then replayed, which removes the per-kernel launch cost that dominates an eager step;
the CPU runs the same step eagerly. A captured graph is trusted only once it has replayed what the step
computes on the same inputs (an empty capture replays nothing, and would repeat every request's first
token): a graph that does not is refused, and so is serving without graphs on a GPU unless
MEDMO_ALLOW_EAGER says so.

Without a `medmo_slots` argument the attention function is plain SDPA, so `generate()` on the same model
still works (it is how the engines are compared).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch._dynamo
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from app.engine.grammar import GrammarMatcher, fill_rows
from app.engine.request import MAX_TOP_LOGPROBS, PreparedRequest, TokenMatcher
from app.engine.runtime import ModelLoadError
from app.engine.sampling import Chosen, RowRules, bitmask_words, choose, needs_rules, samples

logger = logging.getLogger("medmo.engine")

ATTENTION = "medmo_slots"
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
SMALLEST_SPAN = 256
GIB = 1024**3


# --- attention over slots ---


class SlotCache:
    """Keys and values of every layer and slot: (layers, slots, kv_heads, context, head_dim) each."""

    def __init__(
        self,
        *,
        layers: int,
        slots: int,
        context: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (layers, slots, kv_heads, context, head_dim)
        # Zeros, not empty: masked positions still multiply their values by a zero weight, and uninitialised
        # memory can hold NaN, which a zero weight does not cancel.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.context = context

    @staticmethod
    def bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        element = torch.empty((), dtype=dtype).element_size()
        return int(2 * text_config.num_hidden_layers * text_config.num_key_value_heads * head_dim * element)

    def copy(self, source: int, target: int, length: int) -> None:
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]


@dataclass(frozen=True)
class PrefillSlots:
    """A packed prefill: segment i is tokens [start, start + length) of the forward, bound for `slot`."""

    cache: SlotCache
    segments: Sequence[tuple[int, int, int]]  # (slot, start, length)

    def attend(
        self, module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        layer = module.layer_idx
        outputs = []
        for slot, start, length in self.segments:
            end = start + length
            self.cache.keys[layer, slot, :, :length] = key[0, :, start:end]
            self.cache.values[layer, slot, :, :length] = value[0, :, start:end]
            # The same call, on the same tokens, that the model makes for this request alone.
            output, _ = sdpa_attention_forward(
                module,
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                None,
                scaling=scaling,
            )
            outputs.append(output)
        return torch.cat(outputs, dim=1)


@dataclass(frozen=True)
class DecodeSlots:
    """One decode step for slots 0..batch-1; `lengths` is where each row writes, `span` how far all read."""

    cache: SlotCache
    rows: torch.Tensor  # arange(batch)
    lengths: torch.Tensor  # (batch,)
    span: int

    def attend(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        layer = module.layer_idx
        batch, heads, _, head_dim = query.shape
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.rows, :, self.lengths] = key[:, :, 0]
        values[self.rows, :, self.lengths] = value[:, :, 0]
        kv_heads = keys.shape[1]
        # Grouped-query attention without copying the cache per head: the query heads that share a key/value
        # head become that head's rows of queries (one token each, so no causal order among them).
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
        output = F.scaled_dot_product_attention(
            grouped,
            keys[:batch, :, : self.span],
            values[:batch, :, : self.span],
            attn_mask=mask,
            scale=scaling,
        )
        return output.reshape(batch, 1, heads, head_dim)


def slot_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    medmo_slots: PrefillSlots | DecodeSlots | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The text model's attention when it runs for the continuous engine; plain SDPA otherwise."""
    if isinstance(medmo_slots, DecodeSlots):
        assert attention_mask is not None
        return medmo_slots.attend(module, query, key, value, attention_mask, scaling), None
    if isinstance(medmo_slots, PrefillSlots):
        return medmo_slots.attend(module, query, key, value, scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def use_slot_attention(model: Any) -> None:
    """Route the text model's attention through `slot_attention`; the vision tower keeps its own."""
    AttentionInterface.register(ATTENTION, slot_attention)
    # Masks for calls without slots (generate()) are SDPA's; the engine passes its own 4-D masks, which
    # transformers hands to the attention function untouched.
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.model.language_model.config._attn_implementation = ATTENTION


# --- the runner ---


class CaptureError(ModelLoadError):
    """The decode step could not be captured as graphs that replay what it computes."""


class Replayable(Protocol):
    """A captured graph, as the runner uses it."""

    def replay(self) -> None: ...


def buckets_up_to(limit: int, candidates: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({size for size in candidates if size < limit} | {limit}))


def span_buckets(context: int) -> tuple[int, ...]:
    spans = []
    span = SMALLEST_SPAN
    while span < context:
        spans.append(span)
        span *= 2
    return (*spans, context)


def smallest_at_least(value: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if bucket >= value:
            return bucket
    raise ValueError(f"{value} is beyond the largest bucket {buckets[-1]}")


class SlotRunner:
    """Prefill and decode on the device, for the engine's scheduler thread (and no other thread)."""

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        context: int,
        graphs: bool,
        compiled: bool = False,
        allow_eager: bool = True,
    ) -> None:
        """`graphs`: capture the decode step on CUDA/ROCm; `compiled`: run it through torch.compile;
        `allow_eager`: a capture that fails leaves an eager engine instead of stopping the start."""
        use_slot_attention(model)
        self.model = model
        self.slots = slots
        self.context = context
        text = model.model.language_model
        self._text = text
        self._embed = text.embed_tokens
        self._lm_head = model.lm_head
        config = text.config
        device, dtype = model.device, model.dtype
        self.cache = SlotCache(
            layers=config.num_hidden_layers,
            slots=slots,
            context=context,
            kv_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            dtype=dtype,
            device=device,
        )
        self.device = device
        self.batch_buckets = buckets_up_to(slots, BATCH_BUCKETS)
        self.span_buckets = span_buckets(context)
        # Inputs and outputs of the decode step, at fixed addresses so that graphs can replay on them.
        self._tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self._lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self._deltas = torch.zeros(slots, dtype=torch.long, device=device)
        self._rows = torch.arange(slots, device=device)
        self._positions = torch.arange(context, device=device)
        self.lengths = [0] * slots  # the host's copy, for choosing buckets without a device sync
        # Each row's rules for choosing its tokens (sampling, penalty, mask), and the step's logits they are
        # applied to. Rows whose requests ask for none of them take the plain argmax inside the step itself.
        vocabulary = int(self._lm_head.out_features)
        self.rules = RowRules(slots, vocabulary, device)
        self._logits = torch.zeros(slots, vocabulary, dtype=dtype, device=device)
        self._ruled = [False] * slots  # the host's copy: which rows need `choose`
        self._sampling = [False] * slots  # and which of them sample
        self.prompt_tokens_computed = 0  # prompt tokens prefilled so far (a shared prompt counts once)
        # Where launched steps' tokens come back to the host (pinned on a GPU, so the copy runs alongside),
        # two steps' worth, and an event per buffer saying its step has ended.
        pinned = device.type == "cuda"
        self._read_back = [
            (_ReadBack(slots, pinned), torch.cuda.Event() if pinned else None) for _ in range(2)
        ]
        # Constrained rows' masks, written by the host before the step that applies them.
        self._masks = torch.full((slots, bitmask_words(vocabulary)), -1, dtype=torch.int32, pin_memory=pinned)
        self._launches = 0
        self._in_flight: deque[tuple[_ReadBack, torch.cuda.Event | None, int, bool]] = deque()
        self._graphs: dict[tuple[int, int], Replayable] = {}
        # A graph of `choose` per batch bucket, with and without sampling.
        self._choosers: dict[tuple[int, bool], Replayable] = {}
        self._want_graphs = graphs and device.type == "cuda"
        self._allow_eager = allow_eager
        self.graph_note = "off" if not self._want_graphs else "not captured yet"
        # The step that runs and is captured: torch.compile's, or the model's own eager one.
        self._decode_step: Callable[[int, int], None] = self._step
        self._choose_step: Callable[[int, bool], None] = self._choose
        self._compiled = compiled
        self.compile_note = "off"
        # Told (captured, total) after each graph: capture takes minutes for a large model (startup progress).
        self.on_graph_captured: Callable[[int, int], None] | None = None

    # --- startup ---

    def warm_up(self) -> None:
        """Compile the decode step and capture one graph per (batch, span) bucket, each checked against the
        step it captures. A capture that fails stops the start (CaptureError) unless eager decoding is
        allowed, in which case it is said once, in the log and in `describe()`."""
        if self.device.type == "cuda":
            # Streams and graphs belong to the thread's current device: without this, a runner on cuda:1
            # driven from a thread on cuda:0 captures an empty graph, which torch only warns about.
            torch.cuda.set_device(self.device)
        if self._compiled and self.compile_note == "off":
            self._compile()
        if not self._want_graphs:
            self.graph_note = "eager (the CPU has no graphs)" if self.device.type == "cpu" else "off"
            return
        if self._graphs:
            return  # captured already
        try:
            self._capture()
            self.verify_graphs()
        except Exception as exc:
            self._graphs.clear()
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            if not self._allow_eager:
                raise CaptureError(
                    f"the decode step could not be captured as graphs ({type(exc).__name__}: {reason}); without "
                    "them each step pays thousands of kernel launches: fix the cause, or set "
                    "MEDMO_ALLOW_EAGER=true to serve eagerly, or MEDMO_DECODE_GRAPHS=false"
                ) from exc
            self.graph_note = f"eager: capture failed ({type(exc).__name__}: {reason})"
            logger.warning("decode graphs could not be captured; decoding eagerly: %s", self.graph_note)
        finally:
            self._lengths.zero_()

    @property
    def graphs_replaying(self) -> int:
        return len(self._graphs)

    def _compile(self) -> None:
        """The decode step through torch.compile, one graph of fused kernels per bucket (fullgraph: a break
        is an error, not a silent slowdown). Each bucket compiles at its first run, here, not in a request."""
        began = time.monotonic()
        buckets = [(batch, span) for batch in self.batch_buckets for span in self.span_buckets]
        # Every bucket is a shape of its own (dynamic=False: what graphs capture is static anyway), so the
        # recompile limit must hold them all, or later buckets would silently run uncompiled.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(buckets) + 8)
        self._decode_step = torch.compile(self._step, fullgraph=True, dynamic=False)
        self._choose_step = torch.compile(self._choose, fullgraph=True, dynamic=False)
        for batch, span in buckets:
            self._decode_step(batch, span)
        for batch in self.batch_buckets:
            for sample in (False, True):
                self._choose_step(batch, sample)
        self._lengths.zero_()
        self.rules.clear()
        took = time.monotonic() - began
        self.compile_note = f"compiled, {len(buckets)} buckets in {took:.0f} s"
        logger.info("decode step %s", self.compile_note)

    def _capture(self) -> None:
        pool = None
        side = torch.cuda.Stream(device=self.device)
        count = 0
        for batch in reversed(self.batch_buckets):
            for span in reversed(self.span_buckets):
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._decode_step(
                        batch, span
                    )  # first run outside the graph: lazy initialisation, autotuning
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    self._decode_step(batch, span)
                pool = graph.pool()
                self._graphs[(batch, span)] = graph
                count += 1
                if self.on_graph_captured is not None:
                    self.on_graph_captured(count, len(self.batch_buckets) * len(self.span_buckets))
        for batch in reversed(self.batch_buckets):
            for sample in (False, True):
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    self._choose_step(batch, sample)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=side):
                    self._choose_step(batch, sample)
                pool = graph.pool()
                self._choosers[(batch, sample)] = graph
        torch.cuda.synchronize(self.device)
        self.rules.clear()
        self.graph_note = (
            f"{count} graphs ({len(self.batch_buckets)} batch x {len(self.span_buckets)} span buckets), "
            f"and {len(self._choosers)} of the token choice with rules"
        )

    def verify_graphs(self) -> None:
        """Replay every graph on inputs of its own and compare with the step run directly on the same inputs;
        CaptureError for one that differs. An empty capture replays nothing: its tokens stay the inputs."""
        vocabulary = int(self._embed.num_embeddings)
        generator = torch.Generator(device="cpu").manual_seed(0)
        for (batch, span), graph in self._graphs.items():
            tokens = torch.randint(0, vocabulary, (batch,), generator=generator).to(self.device)
            lengths = torch.randint(0, span, (batch,), generator=generator).to(self.device)
            self._tokens[:batch], self._lengths[:batch], self._deltas[:batch] = tokens, lengths, 0
            self._decode_step(batch, span)
            expected = self._tokens[:batch].clone()
            self._tokens[:batch], self._lengths[:batch] = tokens, lengths
            graph.replay()
            replayed = self._tokens[:batch].clone()
            if not torch.equal(replayed, expected) or torch.equal(replayed, tokens):
                raise CaptureError(
                    f"the graph of bucket (batch {batch}, span {span}) does not replay the decode step"
                    + (" (it changes nothing)" if torch.equal(replayed, tokens) else "")
                )
        for (batch, sample), graph in self._choosers.items():
            self._logits[:batch] = torch.randn(batch, self.rules.vocabulary, generator=generator).to(
                self._logits
            )
            self.rules.temperature[:batch] = 1.0
            self.rules.greedy[:batch] = torch.arange(batch, device=self.device) % 2 == 0
            self.rules.seeds[:batch] = torch.randint(0, 2**62, (batch,), generator=generator).to(self.device)
            steps = self.rules.steps[:batch].clone()
            self._choose_step(batch, sample)
            expected = self._tokens[:batch].clone()
            self.rules.steps[:batch] = steps
            self._tokens[:batch] = -1
            graph.replay()
            if not torch.equal(self._tokens[:batch], expected):
                raise CaptureError(
                    f"the graph of the token choice for batch {batch} (sampling: {sample}) does not replay it"
                )
        self._tokens.zero_()
        self._deltas.zero_()
        self.rules.clear()

    # --- the forward passes ---

    def prefill(
        self,
        entries: Sequence[tuple[int, PreparedRequest]],
        masks: Sequence[tuple[int, TokenMatcher]] = (),
    ) -> Chosen:
        """Run new requests' prompts into their slots (consecutive ones); return each one's first token.

        A request whose prompt is the very one (the same prepared features) of an earlier entry, as the n
        choices of one chat request are, is not computed again: the earlier entry's cache rows are copied
        into its slot. `masks` are the constrained entries' grammars, by slot."""
        slots = [slot for slot, _ in entries]
        assert slots == list(range(slots[0], slots[0] + len(slots))), "prefill slots must be consecutive"
        computed: list[tuple[int, PreparedRequest]] = []
        source_of: list[int] = []  # for each entry, its row among the computed ones
        for slot, request in entries:
            earlier = next(
                (row for row, (_, done) in enumerate(computed) if done.features is request.features), None
            )
            if earlier is None:
                computed.append((slot, request))
                earlier = len(computed) - 1
            source_of.append(earlier)
        self.prompt_tokens_computed += sum(request.prompt_tokens for _, request in computed)
        segments = []
        start = 0
        for slot, request in computed:
            segments.append((slot, start, request.prompt_tokens))
            start += request.prompt_tokens
        features = [request.features for _, request in computed]
        device = self.device
        input_ids = torch.cat([f["input_ids"] for f in features], dim=1).to(device)
        positions = torch.cat([request.rope_positions for _, request in computed], dim=1)
        # Every image of every request, in the order their tokens come; text-only requests bring none.
        pictured = [f for f in features if "pixel_values" in f]
        hidden = self.model.model(
            input_ids=input_ids,
            pixel_values=torch.cat([f["pixel_values"] for f in pictured]).to(device) if pictured else None,
            image_grid_thw=torch.cat([f["image_grid_thw"] for f in pictured]).to(device)
            if pictured
            else None,
            position_ids=positions.unsqueeze(1).to(device),
            use_cache=False,
            medmo_slots=PrefillSlots(self.cache, segments),
        ).last_hidden_state
        ends = torch.tensor([begin + length - 1 for _, begin, length in segments], device=device)
        logits = self._lm_head(hidden[0, ends])[torch.tensor(source_of, device=device)]
        for (slot, request), row in zip(entries, source_of, strict=True):
            source = computed[row][0]
            if slot != source:
                self.cache.copy(source, slot, request.prompt_tokens)
            self.rules.set(slot, request.options, request.features["input_ids"][0])
            self._ruled[slot] = needs_rules(request.options)
            self._sampling[slot] = samples(request.options)
            self.lengths[slot] = request.prompt_tokens
        index = torch.tensor(slots, device=device)
        self._lengths[index] = torch.tensor([r.prompt_tokens for _, r in entries], device=device)
        self._deltas[index] = torch.tensor([r.rope_delta for _, r in entries], device=device)
        if not any(self._ruled[slot] for slot in slots):
            first = logits.argmax(-1)
            self._tokens[index] = first
            return Chosen([int(token) for token in first.tolist()])
        self._write_masks(masks)
        first = choose(logits, self.rules, slots[0], sample=any(self._sampling[slot] for slot in slots))
        self._tokens[index] = first
        end = slots[-1] + 1
        return Chosen.read(
            first,
            self.rules.logprob[slots[0] : end],
            self.rules.top_ids[slots[0] : end],
            self.rules.top_logprobs[slots[0] : end],
        )

    def decode(self, active: int, masks: Sequence[tuple[int, TokenMatcher]] = ()) -> Chosen:
        """One step, waited for: `launch` then `collect`."""
        self.launch(active, masks)
        return self.collect()

    def launch(self, active: int, masks: Sequence[tuple[int, TokenMatcher]] = ()) -> None:
        """Start one token for each of slots 0..active-1, from the token each holds (the new ones are held
        next), without waiting for the device: its tokens are copied to the host as the step ends, for
        `collect`. Up to two steps may be launched before the first is collected, so that the scheduler can
        start a step before it reads the previous one's tokens; but a step with `masks` (the constrained
        rows' grammars, by row) must follow the collection of every earlier step, whose tokens the grammars
        have to have taken first."""
        batch = smallest_at_least(active, self.batch_buckets)
        span = smallest_at_least(max(self.lengths[:active]) + 1, self.span_buckets)
        ruled = bool(masks) or any(self._ruled[:active])
        if masks:
            assert not self._in_flight, "a constrained step must wait for the previous step's tokens"
            self._write_masks(masks)
        graph = self._graphs.get((batch, span))
        if graph is not None:
            graph.replay()
        else:
            self._decode_step(batch, span)
        if ruled:
            sample = any(self._sampling[:active])
            chooser = self._choosers.get((batch, sample))
            if chooser is not None:
                chooser.replay()
            else:
                self._choose_step(batch, sample)
        self._lengths[:active] += 1
        self.lengths[:active] = [length + 1 for length in self.lengths[:active]]
        buffer, ready = self._read_back[self._launches % 2]
        buffer.tokens[:active].copy_(self._tokens[:active], non_blocking=True)
        if ruled:
            buffer.logprob[:active].copy_(self.rules.logprob[:active], non_blocking=True)
            buffer.top_ids[:active].copy_(self.rules.top_ids[:active], non_blocking=True)
            buffer.top_logprobs[:active].copy_(self.rules.top_logprobs[:active], non_blocking=True)
        if ready is not None:
            ready.record()
        self._launches += 1
        self._in_flight.append((buffer, ready, active, ruled))

    def collect(self) -> Chosen:
        """The tokens of the oldest launched step not yet collected, once it has ended."""
        buffer, ready, active, ruled = self._in_flight.popleft()
        if ready is not None:
            ready.synchronize()
        if not ruled:
            return Chosen([int(token) for token in buffer.tokens[:active].tolist()])
        return Chosen.read(
            buffer.tokens[:active],
            buffer.logprob[:active],
            buffer.top_ids[:active],
            buffer.top_logprobs[:active],
        )

    def _write_masks(self, masks: Sequence[tuple[int, TokenMatcher]]) -> None:
        """The constrained rows' allowed tokens, from their grammars into their rows of the device's mask,
        in one copy: the rows between them are written as free (every token allowed)."""
        if not masks:
            return
        end = max(row for row, _ in masks) + 1
        self._masks[:end] = -1
        grammars = [(matcher, row) for row, matcher in masks if isinstance(matcher, GrammarMatcher)]
        if len(grammars) > 1:  # filled side by side, on the grammar library's threads
            fill_rows(self._masks, grammars)
        for row, matcher in masks:
            if len(grammars) <= 1 or not isinstance(matcher, GrammarMatcher):
                matcher.fill(self._masks, row)
        self.rules.bitmask[:end].copy_(self._masks[:end], non_blocking=True)

    def _step(self, batch: int, span: int) -> None:
        """The decode step for `batch` rows reading `span` positions: what a graph captures."""
        tokens = self._tokens[:batch]
        lengths = self._lengths[:batch]
        positions = (lengths + self._deltas[:batch]).view(1, batch, 1).expand(3, batch, 1)
        # Row b reads positions 0..lengths[b]: what it holds, and the token it writes in this step.
        mask = (self._positions[:span].view(1, span) <= lengths.view(batch, 1)).view(batch, 1, 1, span)
        hidden = self._text(
            inputs_embeds=self._embed(tokens.view(batch, 1)),
            position_ids=positions,
            attention_mask=mask,
            use_cache=False,
            medmo_slots=DecodeSlots(self.cache, self._rows[:batch], lengths, span),
        ).last_hidden_state
        logits = self._lm_head(hidden[:, -1])
        self._logits[:batch] = logits  # for `_choose`, when some row has rules
        self._tokens[:batch] = logits.argmax(-1)

    def _choose(self, batch: int, sample: bool) -> None:
        """The tokens of the step's rows by their rules, over the logits the step left: what a second graph
        captures, replayed after the step when some running request samples, is penalised, constrained, or
        asks for log-probabilities."""
        self._tokens[:batch] = choose(self._logits[:batch], self.rules, sample=sample)

    def score(self, request: PreparedRequest) -> tuple[float, ...]:
        """Each continuation's log-probability as the answer: the model's own forward, outside the slots."""
        from app.engine.scoring import score_continuations

        assert request.options.continuations is not None
        return score_continuations(self.model, request, request.options.continuations)

    # --- slots ---

    def move(self, source: int, target: int) -> None:
        """Give slot `target` the request held in slot `source` (which becomes free)."""
        length = self.lengths[source]
        self.cache.copy(source, target, length)
        for buffer in (self._tokens, self._lengths, self._deltas):
            buffer[target] = buffer[source]
        self.rules.copy(source, target)
        self.lengths[target] = length
        self._ruled[target] = self._ruled[source]
        self._sampling[target] = self._sampling[source]
        self.release(source)

    def release(self, slot: int) -> None:
        """Mark a slot free. Its cache rows are left as they are: the next prefill into it overwrites them."""
        self._lengths[slot] = 0
        self.lengths[slot] = 0
        self._ruled[slot] = False
        self._sampling[slot] = False

    def describe(self) -> dict[str, object]:
        return {
            "slots": self.slots,
            "context": self.context,
            "kv_cache_gib": round(2 * self.cache.keys.numel() * self.cache.keys.element_size() / GIB, 3),
            "decode_graphs": self.graph_note,
            "compile": self.compile_note,
        }


class _ReadBack:
    """Host buffers a launched step's results are copied into (pinned on a GPU: the copy runs alongside)."""

    def __init__(self, slots: int, pinned: bool) -> None:
        self.tokens = torch.zeros(slots, dtype=torch.long, pin_memory=pinned)
        self.logprob = torch.zeros(slots, dtype=torch.float32, pin_memory=pinned)
        self.top_ids = torch.zeros(slots, MAX_TOP_LOGPROBS, dtype=torch.long, pin_memory=pinned)
        self.top_logprobs = torch.zeros(slots, MAX_TOP_LOGPROBS, dtype=torch.float32, pin_memory=pinned)


def fit_slots(
    text_config: Any, dtype: torch.dtype, device: torch.device, context: int, fraction: float
) -> int:
    """How many slots of `context` tokens fit in what `fraction` of the device's memory leaves free now.

    Called after the weights are loaded. Room is kept for the activations of a prefill and for graphs.
    """
    if device.type != "cuda":
        return 8
    free, total = torch.cuda.mem_get_info(device)
    reserve = 4 * GIB
    budget = free - (1 - fraction) * total - reserve
    per_slot = SlotCache.bytes_per_token(text_config, dtype) * context
    return max(0, min(BATCH_BUCKETS[-1], math.floor(budget / per_slot)))
