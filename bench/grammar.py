"""Grammar libraries for constrained decoding, side by side: compile time and per-step mask fill time.

    python -m bench.grammar [--vocab tiny|151k|both]

For each vocabulary, each installed library (llguidance, which `app/engine/grammar.py` uses, through that
module; xgrammar; outlines-core) compiles a JSON schema, a regex, a choice among strings and MedMO's
grounding grammar, then fills a token bitmask at every step of seeded random walks through each (a random
allowed token each step, ending with probability `--end` whenever the end of turn is allowed). Printed:
compile ms (median of repeats, each a fresh compile), mask fill µs per step (median over the walks' steps),
and each library's time over llguidance's, all measured in this run.

Vocabularies: `tiny`, the test checkpoint's byte-level BPE (about 560 tokens, Qwen's special tokens), and
`151k`, a byte-level BPE of MedMO-8B's size (151,643 tokens, 151,936 logits) trained on the Python files
of this environment (no real Qwen tokenizer is reachable offline) and cached in the temp directory, so
only the first run spends the ~30 s of training. Libraries not installed are skipped.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from app.engine.grammar import Constraint, Grammars, box_constraint, new_bitmask

END_OF_TURN = "<|im_end|>"
QWEN_VOCAB = 151_643  # MedMO-8B's tokenizer
QWEN_LOGITS = 151_936  # its lm_head's rows
CACHE_DIR = Path(tempfile.gettempdir()) / "medmo-bench-grammar"
TRAINING_CHARS = 80_000_000  # enough distinct words for 151k merges

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "findings": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 40},
                    "side": {"enum": ["left", "right", "bilateral", "midline"]},
                    "severity": {"type": "integer", "minimum": 0, "maximum": 10},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
                "required": ["label", "side", "severity"],
                "additionalProperties": False,
            },
        },
        "impression": {"type": "string", "maxLength": 200},
        "urgent": {"type": "boolean"},
    },
    "required": ["findings", "impression", "urgent"],
    "additionalProperties": False,
}
REGEX = r"(?:No|Yes), (?:left|right|bilateral) [a-z]{3,12} lobe, [0-9]{1,2}(?:\.[0-9])? cm"
CHOICES = ["left", "left lower lobe", "left upper lobe", "right", "right lower lobe", "bilateral", "none"]
BOX = box_constraint((1344, 1024), max_findings=4)
KINDS = ("json_schema", "regex", "choice", "box")


class UnsupportedError(Exception):
    """The library has no way to take this kind of constraint."""


class Matcher(Protocol):
    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...
    def accept(self, token: int) -> None: ...


class Library(Protocol):
    name: str

    def compile(self, kind: str) -> Callable[[], Matcher]:
        """Compile the bench's constraint of this kind; the result makes matchers."""
        ...


@dataclass
class Vocabulary:
    name: str
    tokenizer: PreTrainedTokenizerFast
    logits: int
    eos: int


# --- the libraries ---


class Llguidance:
    name = "llguidance"

    def __init__(self, vocabulary: Vocabulary) -> None:
        # No cache: every compile is measured as a fresh one.
        self.grammars = Grammars(
            vocabulary.tokenizer, vocab_size=vocabulary.logits, eos_token_ids=[vocabulary.eos], cache_size=0
        )

    def compile(self, kind: str) -> Callable[[], Matcher]:
        constraint = {
            "json_schema": Constraint.json_schema(SCHEMA),
            "regex": Constraint.regex(REGEX),
            "choice": Constraint.choice(CHOICES),
            "box": BOX,
        }[kind]
        return self.grammars.compile(constraint).matcher


class XGrammarMatcher:
    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"xgrammar refused token {token}")


class XGrammar:
    name = "xgrammar"

    def __init__(self, vocabulary: Vocabulary) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            vocabulary.tokenizer, vocab_size=vocabulary.logits, stop_token_ids=[vocabulary.eos]
        )
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, kind: str) -> Callable[[], Matcher]:
        if kind == "json_schema":
            compiled = self.compiler.compile_json_schema(
                SCHEMA, any_whitespace=False, separators=(", ", ": ")
            )
        elif kind == "regex":
            compiled = self.compiler.compile_regex(REGEX)
        elif kind == "choice":
            compiled = self.compiler.compile_lark(_choice_lark())
        else:
            compiled = self.compiler.compile_lark(BOX.text)
        return lambda: XGrammarMatcher(self.xgrammar.GrammarMatcher(compiled))


class OutlinesMatcher:
    def __init__(self, guide: Any) -> None:
        self.guide = guide

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        self.guide.write_mask_into(target.data_ptr(), target.numel(), 4)

    def accept(self, token: int) -> None:
        self.guide.advance(token, return_tokens=False)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocabulary: Vocabulary) -> None:
        import outlines_core  # type: ignore[import-untyped]
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.outlines = outlines_core
        # Its Vocabulary maps each token's bytes to ids: byte-level BPE's printable stand-ins turned back.
        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}  # type: ignore[no-untyped-call]
        special = set(vocabulary.tokenizer.all_special_ids)
        tokens: dict[bytes, list[int]] = {}
        for token, token_id in vocabulary.tokenizer.get_vocab().items():
            if token_id not in special:
                tokens.setdefault(bytes(to_byte[char] for char in token), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(vocabulary.eos, tokens)

    def compile(self, kind: str) -> Callable[[], Matcher]:
        if kind == "json_schema":
            regex = self.outlines.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
        elif kind == "regex":
            regex = REGEX
        elif kind == "choice":
            regex = "|".join(re.escape(option) for option in CHOICES)
        else:
            raise UnsupportedError("regular expressions only")
        index = self.outlines.Index(regex, self.vocabulary)
        return lambda: OutlinesMatcher(self.outlines.Guide(index))


LIBRARIES: dict[str, Callable[[Vocabulary], Library]] = {
    "llguidance": Llguidance,
    "xgrammar": XGrammar,
    "outlines-core": OutlinesCore,
}


def _choice_lark() -> str:
    return "start: " + " | ".join(json.dumps(option) for option in CHOICES)


# --- the vocabularies ---


def tiny_vocabulary() -> Vocabulary:
    from app.tiny_checkpoint import build_tokenizer

    tokenizer = build_tokenizer()
    return Vocabulary("tiny", tokenizer, len(tokenizer), _token_id(tokenizer, END_OF_TURN))


def qwen_sized_vocabulary() -> Vocabulary:
    from tokenizers import Tokenizer

    path = CACHE_DIR / f"bpe-{QWEN_VOCAB}.json"
    if not path.exists():
        print(f"training a {QWEN_VOCAB}-token byte-level BPE (once; cached at {path}) ...", flush=True)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        _train_bpe().save(str(partial))
        partial.replace(path)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer.from_file(str(path)), eos_token=END_OF_TURN, pad_token="<|endoftext|>"
    )
    return Vocabulary("151k", tokenizer, QWEN_LOGITS, _token_id(tokenizer, END_OF_TURN))


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found


def _train_bpe() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from app.tiny_checkpoint import SPECIAL_TOKENS

    # The same model, pre-tokenizer and decoder as the test checkpoint's (and Qwen's): byte-level BPE.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_local_text(), trainer)
    return bpe


def _local_text() -> Iterator[str]:
    site_packages = Path(np.__file__).parent.parent
    total = 0
    for path in sorted(site_packages.rglob("*.py")):
        text = path.read_text(errors="replace")
        yield text
        total += len(text)
        if total >= TRAINING_CHARS:
            return


# --- measuring ---


def compile_ms(
    library: Library, kind: str, budget_s: float = 2.0, most: int = 5
) -> tuple[float, Callable[[], Matcher]]:
    """Median of fresh compiles (as many as fit in `budget_s`, between 1 and `most`), and the last one."""
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < most and (not times or time.perf_counter() - started < budget_s):
        begin = time.perf_counter()
        compiled = library.compile(kind)
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times), compiled


def fill_us(
    make_matcher: Callable[[], Matcher], vocabulary: Vocabulary, *, walks: int, steps: int, end: float
) -> float:
    """Median time of one mask fill, over the steps of seeded random walks through the grammar."""
    bitmask = new_bitmask(1, vocabulary.logits)
    times: list[float] = []
    for seed in range(walks):
        rng = random.Random(seed)
        matcher = make_matcher()
        for _ in range(steps):
            begin = time.perf_counter_ns()
            matcher.fill(bitmask, 0)
            times.append((time.perf_counter_ns() - begin) / 1e3)
            allowed = allowed_tokens(bitmask[0], vocabulary.logits)
            others = [token for token in allowed if token != vocabulary.eos]
            if not others or (len(others) < len(allowed) and rng.random() < end):
                break
            matcher.accept(rng.choice(others))
    return statistics.median(times)


def allowed_tokens(row: torch.Tensor, logits: int) -> list[int]:
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:logits]
    return [int(token) for token in np.flatnonzero(bits)]


def measure(vocabulary: Vocabulary, names: list[str], *, walks: int, steps: int, end: float) -> None:
    print(
        f"\n== vocabulary {vocabulary.name}: {len(vocabulary.tokenizer)} tokens, {vocabulary.logits} logits",
        flush=True,
    )
    libraries: dict[str, Library] = {}
    for name in names:
        begin = time.perf_counter()
        try:
            libraries[name] = LIBRARIES[name](vocabulary)
        except ImportError:
            print(f"{name}: not installed, skipped")
            continue
        print(f"{name}: tokenizer setup {(time.perf_counter() - begin) * 1e3:.0f} ms", flush=True)
    compiles: dict[tuple[str, str], float] = {}
    fills: dict[tuple[str, str], float] = {}
    for kind in KINDS:
        for name, library in libraries.items():
            try:
                compiles[name, kind], make_matcher = compile_ms(library, kind)
                fills[name, kind] = fill_us(make_matcher, vocabulary, walks=walks, steps=steps, end=end)
            except UnsupportedError as reason:
                print(f"{name}: {kind} not supported ({reason})")
    _table("compile ms (median of fresh compiles)", compiles, libraries, "{:.2f}")
    _table("mask fill µs per step (median over random walks)", fills, libraries, "{:.1f}")


def _table(title: str, values: dict[tuple[str, str], float], libraries: dict[str, Any], form: str) -> None:
    names = list(libraries)
    others = [name for name in names if name != "llguidance"]
    header = f"{'':<12}" + "".join(f"{name:>15}" for name in names)
    header += "".join(f"{name + '/llg':>19}" for name in others if "llguidance" in libraries)
    print(f"\n{title}\n{header}")
    for kind in KINDS:
        line = f"{kind:<12}"
        for name in names:
            value = values.get((name, kind))
            line += f"{form.format(value) if value is not None else 'n/a':>15}"
        base = values.get(("llguidance", kind))
        for name in others if "llguidance" in libraries else []:
            value = values.get((name, kind))
            line += f"{f'{value / base:.1f}x' if value is not None and base else 'n/a':>19}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", choices=["tiny", "151k", "both"], default="both")
    parser.add_argument("--libraries", nargs="+", choices=list(LIBRARIES), default=list(LIBRARIES))
    parser.add_argument("--walks", type=int, default=3, help="random walks per grammar (seeds 0..)")
    parser.add_argument("--steps", type=int, default=200, help="most steps per walk")
    parser.add_argument("--end", type=float, default=0.1, help="chance of ending when the end is allowed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    vocabularies = {"tiny": [tiny_vocabulary], "151k": [qwen_sized_vocabulary]}.get(
        args.vocab, [tiny_vocabulary, qwen_sized_vocabulary]
    )
    for build in vocabularies:
        measure(build(), args.libraries, walks=args.walks, steps=args.steps, end=args.end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
