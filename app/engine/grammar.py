"""Constrained decoding's grammar side: which tokens may come next, so an answer is a string of a language.

A `Constraint` names a language (a JSON schema, any JSON object, a regex, a choice among strings, or a
Lark grammar). `Grammars`, built once per loaded model, compiles it against the model's vocabulary into a
`CompiledGrammar`, cached and shared by every request that asks for the same constraint; each request
decoding under it takes a `GrammarMatcher` of its own. Before each decode step the engine has the matcher
write the allowed next tokens into its row of an int32 bitmask (bit t%32 of word t//32 set: token t
allowed), then tells it the token chosen. Once the answer is a complete string of the language the only
token allowed is the end of turn, so the answer ends there.

The library underneath is llguidance (Microsoft's, which vLLM, SGLang and llama.cpp use too): an Earley
parser over a lazily built lexer, so a grammar compiles in about a millisecond even over MedMO's 151k-token
vocabulary (no per-grammar pass over the whole vocabulary), masks take tens of microseconds, its wheel
depends on nothing, and its JSON-schema support covers what clients send (bounds, lengths, enums, $ref,
anyOf, formats) and refuses by name what it does not support. `python -m bench.grammar` measures it
against xgrammar and outlines-core.

`box_constraint` is MedMO's own grounding reply syntax, so a /ground reply always parses.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from copy import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import llguidance
import tokenizers
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

ConstraintKind = Literal["json_schema", "regex", "choice", "lark"]

# Longest constraint text accepted, whatever its kind: a bound on the work one request can ask of the
# compiler before the library's own limits (below) apply.
MAX_CONSTRAINT_CHARS = 100_000

# JSON is written compactly, the way json.dumps writes it. Free whitespace (JSON's own rule) would let an
# answer spend its tokens on blank lines, which weak or random-weight models do.
_JSON_FORMAT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

# The library's limits bound the work of compiling and of each step (its "fuel"); past them a matcher
# enters an error state instead of running on. Its errors then name the problem without echoing the
# grammar or the parser's state.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)

# The bits of a bitmask word, as int32: bit 31 set makes it negative.
_ALL_ALLOWED = -1
_BITS_PER_WORD = 32


class ConstraintError(ValueError):
    """A constraint the grammar library refuses: an invalid or unsupported schema, regex or grammar."""


class MatcherError(RuntimeError):
    """A matcher was told a token its mask did not allow, or could not work out the next mask."""


@dataclass(frozen=True)
class Constraint:
    """A language an answer must belong to. Equal constraints have equal text, so they share one compile."""

    kind: ConstraintKind
    text: str  # canonical for the kind: a schema's sorted JSON, a choice's sorted options as JSON

    def __post_init__(self) -> None:
        if len(self.text) > MAX_CONSTRAINT_CHARS:
            raise ConstraintError(
                f"the {_KIND_NAMES[self.kind]} is {len(self.text)} characters long; at most "
                f"{MAX_CONSTRAINT_CHARS} are accepted"
            )

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any]) -> Constraint:
        """JSON text valid under `schema` (JSON Schema, as OpenAI's response_format json_schema takes).

        A number is written with at most six decimals (`multipleOf` 1e-6 where the schema sets no step):
        JSON's grammar lets a fraction run on for ever, and a model that repeats a digit would fill its
        whole answer with one number. What is written still validates against the schema as given."""
        if not isinstance(schema, Mapping):
            raise ConstraintError("a JSON schema must be a JSON object")
        try:
            text = json.dumps(_stepped_numbers(schema), sort_keys=True, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ConstraintError(f"the JSON schema is not JSON: {error}") from None
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object, as OpenAI's response_format json_object asks."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        """Text the regex matches whole (Rust's regex syntax, which Python's shares for common patterns)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Constraint:
        """Exactly one of the options."""
        if isinstance(options, str) or not all(isinstance(option, str) for option in options):
            raise ConstraintError("a choice is a list of strings")
        if not options:
            raise ConstraintError("a choice needs at least one option")
        if not all(options):
            raise ConstraintError("a choice's options must not be empty")
        return cls("choice", json.dumps(sorted(set(options)), ensure_ascii=False))

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        """Text of a context-free grammar in llguidance's Lark syntax (its rule `start` is the answer)."""
        return cls("lark", lark)


_KIND_NAMES: dict[ConstraintKind, str] = {
    "json_schema": "JSON schema",
    "regex": "regex",
    "choice": "choice",
    "lark": "grammar",
}


NUMBER_STEP = 1e-6


def _stepped_numbers(schema: Any) -> Any:
    """The schema with every number that has no `multipleOf` given one of NUMBER_STEP."""
    if isinstance(schema, Mapping):
        stepped = {key: _stepped_numbers(value) for key, value in schema.items()}
        kind = schema.get("type")
        if (kind == "number" or (isinstance(kind, list) and "number" in kind)) and "multipleOf" not in schema:
            stepped["multipleOf"] = NUMBER_STEP
        return stepped
    if isinstance(schema, list):
        return [_stepped_numbers(item) for item in schema]
    return schema


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one row of a token bitmask over `vocab_size` logits."""
    return (vocab_size + _BITS_PER_WORD - 1) // _BITS_PER_WORD


def new_bitmask(rows: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (rows, words) int32 token bitmask with every token allowed."""
    return torch.full((rows, bitmask_words(vocab_size)), _ALL_ALLOWED, dtype=torch.int32, device=device)


class FastTokenizer(Protocol):
    """What `Grammars` needs of a tokenizer: a transformers fast tokenizer's Rust tokenizer."""

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer: ...


class GrammarMatcher:
    """One answer's place in its grammar (a `TokenMatcher`)."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int) -> None:
        self._matcher = matcher
        self._words = words
        self._staging: torch.Tensor | None = None  # for a bitmask off the CPU

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of `bitmask`, an int32 (rows, words) tensor.

        A CPU bitmask (pinned, for the copy to the device) is written in place, with no copy; any other is
        written through a CPU row of this matcher's own.
        """
        _check_bitmask(bitmask, self._words)
        if not 0 <= row < bitmask.shape[0]:
            raise IndexError(f"row {row} is outside a bitmask of {bitmask.shape[0]} rows")
        if bitmask.is_cpu and bitmask.stride(1) == 1:
            # The row's address, without making a view of it: this runs for every row at every step.
            self._compute_mask_at(bitmask.data_ptr() + row * bitmask.stride(0) * 4)
            return
        if self._staging is None:
            self._staging = torch.empty(self._words, dtype=torch.int32)
        self._compute_mask_at(self._staging.data_ptr())
        bitmask[row].copy_(self._staging)

    def accept(self, token: int) -> None:
        """Advance past `token`, which the last mask must have allowed."""
        if not self._matcher.consume_token(token):
            raise MatcherError(f"token {token} does not continue the constrained answer: {self._error()}")

    @property
    def finished(self) -> bool:
        """True once the answer is complete and the end of turn accepted (or the matcher failed)."""
        return self._matcher.is_stopped()

    def _compute_mask_at(self, address: int) -> None:
        # The library writes the row itself, without the GIL; the size must be exactly one row's.
        self._matcher.unsafe_compute_mask_ptr(address, self._words * 4)
        if self._matcher.is_error():
            raise MatcherError(f"no next token could be worked out: {self._error()}")

    def _error(self) -> str:
        return _summarise(self._matcher.get_error()) or "the matcher is in an error state"


def fill_rows(bitmask: torch.Tensor, rows: Sequence[tuple[GrammarMatcher, int]]) -> None:
    """Fill several rows at once, each `(matcher, row)`: the same as `matcher.fill(bitmask, row)` for each,
    computed on the library's threads (80% of the CPUs, up to 32), without the GIL.

    For a CPU bitmask; a step with many constrained rows spends a fraction of the time filling them.
    """
    _check_bitmask(bitmask, rows[0][0]._words if rows else bitmask.shape[1])
    if not (bitmask.is_cpu and bitmask.is_contiguous()):
        raise ValueError("rows are filled together only in a contiguous CPU bitmask")
    if not rows:
        return
    if len({row for _, row in rows}) != len(rows) or not all(0 <= row < bitmask.shape[0] for _, row in rows):
        raise IndexError("each matcher needs a row of its own, inside the bitmask")
    words = bitmask.shape[1]
    _executor().unsafe_compute_mask_ptr(
        [(matcher._matcher, row) for matcher, row in rows], bitmask.data_ptr(), words * 4, bitmask.shape[0]
    )
    for matcher, _ in rows:
        if matcher._matcher.is_error():
            raise MatcherError(f"no next token could be worked out: {matcher._error()}")


_EXECUTOR: llguidance.LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = llguidance.LLExecutor()
        return _EXECUTOR


def _check_bitmask(bitmask: torch.Tensor, words: int) -> None:
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2 or bitmask.shape[1] != words:
        raise ValueError(
            f"a token bitmask is an int32 tensor of shape (rows, {words}); got {bitmask.dtype} "
            f"{tuple(bitmask.shape)}"
        )


class CompiledGrammar:
    """A constraint compiled against one model's vocabulary (a `Constrained`): shared, never mutated."""

    def __init__(self, constraint: Constraint, prototype: llguidance.LLMatcher, words: int) -> None:
        self.constraint = constraint
        self._prototype = prototype  # at the start of an answer, its first mask already worked out
        self._words = words

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of an answer; it shares the compiled grammar, not its state."""
        return GrammarMatcher(self._prototype.deep_copy(), self._words)


class Grammars:
    """Compiles constraints against one model's vocabulary, keeping the `cache_size` most recently used.

    `vocab_size` is the width of the model's logits, which may exceed the tokenizer's size (MedMO's 151,936
    rows over 151,643 tokens): the rows past the tokenizer are never allowed. `eos_token_ids` are the
    tokens that end a complete answer (the end of turn), the only ones allowed once the answer is complete.
    Safe to call from several threads: a constraint asked for by several at once is compiled once.
    """

    def __init__(
        self,
        tokenizer: FastTokenizer,
        *,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = 64,
    ) -> None:
        eos = sorted(set(eos_token_ids))
        if not eos:
            raise ValueError("a constrained answer needs an end-of-turn token to end on")
        backend = copy(tokenizer.backend_tokenizer)  # the Rust tokenizer, without padding or truncation
        backend.no_padding()
        backend.no_truncation()
        tokenizer_size = backend.get_vocab_size(with_added_tokens=True)
        if vocab_size < tokenizer_size:
            raise ValueError(
                f"vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer_size} tokens"
            )
        if cache_size < 0:
            raise ValueError("cache_size must be at least 0")
        # Converting the vocabulary takes about a second for 151k tokens: once per model.
        self._tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.cache_size = cache_size
        self.compilations = 0  # grammars compiled (cache misses), for tests and metrics
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, Future[CompiledGrammar]] = OrderedDict()

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """The constraint compiled (once while cached). Raises ConstraintError for one the library refuses."""
        with self._lock:
            pending = self._cache.get(constraint)
            owner = pending is None
            if pending is None:
                pending = Future()
                self.compilations += 1
                if self.cache_size:
                    self._cache[constraint] = pending
                    while len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(constraint)
        if owner:
            # Compiled outside the lock, so other constraints compile alongside; others asking for this
            # one wait on its future. A refusal is not kept: the cache holds only grammars.
            try:
                pending.set_result(self._build(constraint))
            except BaseException as error:
                with self._lock:
                    if self._cache.get(constraint) is pending:
                        del self._cache[constraint]
                pending.set_exception(error)
        return pending.result()

    def _build(self, constraint: Constraint) -> CompiledGrammar:
        grammar = _library_grammar(constraint)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_LIMITS)
        if not matcher.is_error():
            # The first mask finishes building the lexer: paid here, in the preparing thread, not in the
            # first decode step; a grammar that allows no token at all fails here too.
            first = torch.empty(self.words, dtype=torch.int32)
            matcher.unsafe_compute_mask_ptr(first.data_ptr(), self.words * 4)
        if matcher.is_error():
            reason = _summarise(matcher.get_error(), keep_position=constraint.kind == "lark")
            raise ConstraintError(f"invalid {_KIND_NAMES[constraint.kind]}: {reason}")
        return CompiledGrammar(constraint, matcher, self.words)


def _library_grammar(constraint: Constraint) -> str:
    """The constraint in llguidance's own grammar format (which it checks only when a matcher is built)."""
    if constraint.kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(constraint.text, overrides=_JSON_FORMAT)
        except ValueError as error:  # numbers the library cannot hold, and the like
            raise ConstraintError(f"invalid JSON schema: {_summarise(str(error))}") from None
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.text)
    if constraint.kind == "choice":
        options = json.loads(constraint.text)
        # A JSON string is a Lark string literal; the options of a choice are alternatives of `start`.
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(option) for option in options)
        )
    return llguidance.LLMatcher.grammar_from_lark(constraint.text)


def _summarise(error: str, *, keep_position: bool = False) -> str:
    """The library's error in one line, without the grammar text it echoes.

    A regex parse error's own `error:` line says what is wrong (the lines above it repeat the regex).
    Positions point into the Lark text the library builds from a schema or regex, which the client never
    saw; they are kept only for a grammar the caller wrote.
    """
    lines = [line.strip() for line in error.splitlines() if line.strip() not in ("", "<non-verbose/>")]
    reasons = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
    summary = "; ".join(reasons) if reasons else (lines[0] if lines else "")
    if not keep_position and summary.startswith("at ") and ": " in summary:
        summary = summary.split(": ", 1)[1]
    return summary[:300]


# --- MedMO's grounding reply ---

# How long a finding's label may be, and how many boxes one label may have: bounds that keep a
# grounding reply finite whatever the model's weights.
BOX_LABEL_MAX_TOKENS = 24
MAX_BOXES_PER_FINDING = 4


def box_constraint(
    model_input_size: tuple[int, int],
    *,
    max_findings: int,
    max_boxes_per_finding: int = MAX_BOXES_PER_FINDING,
    none_found: bool = True,
) -> Constraint:
    """MedMO's grounding reply, one finding a line: `Fractures <box>[[156, 516, 231, 607], ...]</box>`.

    Coordinates are integers in absolute pixels of the model's input image, `model_input_size` being its
    (width, height): x in 0..width, y in 0..height (for the 0-1000 convention, pass (1000, 1000)). A label
    starts with a letter and holds letters, digits, spaces and `,.'/:;%+-` (it may end in the space before
    `<box>`); no brackets, braces or `<`, so no part of it reads as a box or markup to
    `app.tasks.ground`'s parser, which reads every reply of this grammar as exactly the boxes written,
    each labelled. A label is at most BOX_LABEL_MAX_TOKENS tokens: a bound on tokens, not characters, so
    that the lexer keeps one state for the whole label (a bound on characters costs the mask several
    times as much on a large vocabulary). Corner order (x1 <= x2) is not expressible cheaply in a grammar:
    the parser orders corners and drops a box of zero width or height.

    `none_found`: a line may also be text alone, so that a reply can be one sentence and no box at all
    ("No acute abnormality."): a grammar that forced a box on every image would draw a finding on a
    normal study. An impression may follow the findings after a blank line. Without it, every line has
    its boxes.
    """
    width, height = model_input_size
    if width < 1 or height < 1:
        raise ValueError(f"an image is at least 1x1 pixels; got {width}x{height}")
    if max_findings < 1 or max_boxes_per_finding < 1:
        raise ValueError("a grounding reply has at least one finding of at least one box")
    lines = f'line ("\\n" line){{0,{max_findings - 1}}}'
    lark = "\n".join(
        [
            f'start: {lines} ("\\n\\n" text)?' if none_found else f"start: {lines}",
            "line: text boxes?" if none_found else "line: text boxes",
            f'boxes: "<box>[" box (", " box){{0,{max_boxes_per_finding - 1}}} "]</box>"',
            'box: "[" X ", " Y ", " X ", " Y "]"',
            f"text[max_tokens={BOX_LABEL_MAX_TOKENS}]: TEXT",
            r"TEXT: /[A-Za-z][A-Za-z0-9 ,.'\/:;%+-]*/",
            f"X: /{integer_range_regex(0, width)}/",
            f"Y: /{integer_range_regex(0, height)}/",
        ]
    )
    return Constraint.grammar(lark)


def integer_range_regex(low: int, high: int) -> str:
    """A regex matching exactly the decimal integers low..high (non-negative, no leading zeros)."""
    if not 0 <= low <= high:
        raise ValueError(f"need 0 <= low <= high; got {low}..{high}")
    alternatives = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        smallest = 0 if digits == 1 else 10 ** (digits - 1)
        start, end = max(low, smallest), min(high, 10**digits - 1)
        alternatives.append(_same_length_range(str(start), str(end)))
    return alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"


def _same_length_range(start: str, end: str) -> str:
    """A regex for the numbers start..end written with the same number of digits."""
    if start == end:
        return start
    if len(start) == 1:
        return f"[{start}-{end}]"
    if start[0] == end[0]:
        return start[0] + _same_length_range(start[1:], end[1:])
    rest = len(start) - 1
    any_rest = f"[0-9]{{{rest}}}" if rest > 1 else "[0-9]"
    low_digit, high_digit = int(start[0]), int(end[0])
    parts = []
    # The part from `start` to the end of its leading digit, unless it is the whole of that digit.
    if start[1:] != "0" * rest:
        parts.append(start[0] + _same_length_range(start[1:], "9" * rest))
        low_digit += 1
    tail = None
    if end[1:] != "9" * rest:
        tail = end[0] + _same_length_range("0" * rest, end[1:])
        high_digit -= 1
    if low_digit <= high_digit:
        lead = str(low_digit) if low_digit == high_digit else f"[{low_digit}-{high_digit}]"
        parts.append(lead + any_rest)
    if tail is not None:
        parts.append(tail)
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"
