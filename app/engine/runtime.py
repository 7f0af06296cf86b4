"""The model runtime: loads MedMO with transformers once, prepares requests, runs batches through generate().

Preparing (resize, chat template, processor, rope positions) is done per request, in whichever thread the
caller uses, so it overlaps with the model's work on other requests. `generate()` takes any number of prepared
requests and runs them as one call of transformers' `generate()`: the reference every engine is held to.
Batching is the caller's business, not this module's.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from PIL import Image
from qwen_vl_utils import fetch_image, smart_resize
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from app.conversation import Conversation
from app.engine.grammar import CompiledGrammar, Constraint, Grammars
from app.engine.request import (
    FinishReason,
    Generation,
    GenerationOptions,
    PreparedRequest,
    TokenLogprobs,
    TokenMatcher,
)
from app.engine.sampling import RowRules, bitmask_words, choose, needs_rules, samples
from app.imaging.errors import UnusableImageError
from app.settings import Settings
from app.startup import weights
from app.startup.progress import Phase, StartupProgress, transformers_bars
from app.startup.weights import WeightsError


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what failed and what to set."""


@dataclass(frozen=True)
class RuntimeDescription:
    model: str
    revision: str | None
    device: str
    dtype: str
    attn_implementation: str


class Runtime(Protocol):
    """What the service and its engines need from a runtime; ModelRuntime is the real one."""

    description: RuntimeDescription
    model: Any  # the transformers model, for engines that drive its forward passes themselves
    eos_token_ids: frozenset[int]
    control_tokens: frozenset[str]  # the tokenizer's special tokens, which client text may not carry
    processor: Any  # the transformers processor; its tokenizer spells tokens out (chat logprobs)
    grammars: Grammars  # compiles constraints against this model's vocabulary

    def prepare(
        self, conversation: Conversation, options: GenerationOptions, *, max_pixels: int | None = None
    ) -> PreparedRequest: ...

    def generate(self, batch: Sequence[PreparedRequest]) -> list[Generation]: ...

    def finish(
        self,
        request: PreparedRequest,
        tokens: Iterable[int],
        logprobs: Sequence[TokenLogprobs] | None = None,
    ) -> Generation: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def answer_tokens(self, answer: str) -> tuple[int, ...]: ...

    def constrained(self, request: PreparedRequest, constraint: Constraint) -> PreparedRequest: ...


@dataclass(frozen=True)
class Placement:
    """Where and how the model runs, resolved from the settings' "auto" values."""

    device: torch.device
    dtype: torch.dtype
    attention: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Placement:
        device = resolve_device(settings.device)
        return cls(
            device=device,
            dtype=resolve_dtype(settings.dtype, device),
            attention=resolve_attention(settings.attn_implementation, device),
        )

    @classmethod
    def checked(cls, settings: Settings) -> Placement:
        """The placement, once its device, dtype and attention are known to work here (else ModelLoadError)."""
        placement = cls.from_settings(settings)
        placement.check_device(settings.device)
        placement.check_dtype()
        placement.check_attention()
        return placement

    def check_device(self, setting: str) -> str:
        """The device, described; a ModelLoadError saying why if torch cannot use it."""
        if self.device.type == "cpu":
            return "cpu" if setting == "cpu" else "cpu (no GPU visible to torch)"
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"MEDMO_DEVICE={setting} but torch sees no GPU ({_torch_build()}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}): check the driver and the container's GPU "
                "access, or set MEDMO_DEVICE=cpu"
            )
        index = self.device.index or 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelLoadError(
                f"MEDMO_DEVICE={setting} but torch sees {count} GPU(s): cuda:0 to cuda:{count - 1}"
            )
        properties = torch.cuda.get_device_properties(index)
        return (
            f"cuda:{index} ({properties.name}, {properties.total_memory / 1024**3:.0f} GiB; {_torch_build()})"
        )

    def check_dtype(self) -> str:
        """The dtype, described; a ModelLoadError if the device cannot hold it."""
        name = str(self.dtype).removeprefix("torch.")
        if self.device.type == "cuda" and self.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ModelLoadError(
                f"{torch.cuda.get_device_name(self.device)} does not support bfloat16: set MEDMO_DTYPE=float16"
            )
        try:
            torch.zeros(1, dtype=self.dtype, device=self.device)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{self.device} cannot hold {name} tensors ({exc}): set MEDMO_DTYPE"
            ) from exc
        return name

    def check_attention(self) -> str:
        """The attention implementation, described; a ModelLoadError if it cannot run here."""
        if self.attention == "flash_attention_2":
            if self.device.type != "cuda":
                raise ModelLoadError(
                    f"MEDMO_ATTN_IMPLEMENTATION=flash_attention_2 needs a GPU, and the device is {self.device}: "
                    "set it to sdpa or auto"
                )
            if importlib.util.find_spec("flash_attn") is None:
                raise ModelLoadError(
                    "MEDMO_ATTN_IMPLEMENTATION=flash_attention_2 but flash_attn is not installed: install it "
                    "(the images: --build-arg FLASH_ATTENTION=true), or set it to sdpa or auto"
                )
        return self.attention


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        # ROCm builds of torch answer to "cuda" too, so this covers AMD Instinct cards.
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, setting)
    assert isinstance(dtype, torch.dtype)
    return dtype


def resolve_attention(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def collate(features: Sequence[Mapping[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack single-request processor outputs into one batch, as the processor would for a list.

    Per-token tensors (input ids, attention mask, token types) are padded on the left, which generation
    needs; image tensors are already flat rows of patches with a grid per image, so they concatenate
    (requests without images add none).
    The processor cannot do this itself: it only pads text it tokenizes in the same call.
    """
    longest = max(int(item["input_ids"].shape[1]) for item in features)
    batch: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(key for item in features for key in item):
        holding = [item for item in features if key in item]  # text-only requests hold no image tensors
        if all(item[key].shape == item["input_ids"].shape for item in holding):
            fill = pad_token_id if key == "input_ids" else 0
            batch[key] = torch.cat(
                [F.pad(t[key], (longest - t[key].shape[1], 0), value=fill) for t in holding]
            )
        else:
            batch[key] = torch.cat([item[key] for item in holding])
    return batch


class ModelRuntime:
    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        description: RuntimeDescription,
        min_pixels: int,
        max_pixels: int,
        system_prompt: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.description = description
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.system_prompt = system_prompt
        self.patch_size = int(processor.image_processor.patch_size)
        self.merge_size = int(processor.image_processor.merge_size)
        tokenizer = processor.tokenizer
        self.pad_token_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)
        # Those that open turns and stand for images among them (<|im_start|>, <|image_pad|>, ...): every
        # added token marked special, and the named special tokens.
        self.control_tokens = frozenset(
            [
                *tokenizer.all_special_tokens,
                *(token.content for token in tokenizer.added_tokens_decoder.values() if token.special),
            ]
        )
        # Fast tokenizers are not safe to call from several threads at once ("Already borrowed"): encoding
        # changes their state. Decoding does not, so it has a copy of its own, free of the lock, for the
        # event loop (streamed text) and the engines' threads.
        self._processor_lock = threading.Lock()
        self._decoder = copy.deepcopy(tokenizer)
        # Constraints are compiled against the model's logits, which may be wider than the tokenizer; a
        # constrained answer ends on the end-of-turn token alone.
        self.grammars = Grammars(
            tokenizer,
            vocab_size=int(model.lm_head.out_features),
            eos_token_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
        )

    @classmethod
    def load(cls, settings: Settings, progress: StartupProgress | None = None) -> ModelRuntime:
        """Load model and processor onto the device, from MEDMO_MODEL's folder or its hub snapshot, downloaded
        first where the cache lacks it (HF_HOME and HF_HUB_OFFLINE apply). `progress` shows the phases."""
        progress = progress or StartupProgress(interval_s=settings.progress_interval_s)
        name = settings.model
        # Before minutes of downloading and loading, not after them.
        placement = Placement.checked(settings)
        try:
            checkpoint = weights.resolve(settings, progress)
        except WeightsError as exc:
            raise ModelLoadError(str(exc)) from exc
        dtype = str(placement.dtype).removeprefix("torch.")
        with (
            progress.phase(
                Phase.LOADING,
                began=f"loading {name} onto {placement.device} ({dtype}, {placement.attention} attention)",
                ended=f"loaded {name}",
                model=name,
                device=str(placement.device),
            ),
            transformers_bars(progress),
        ):
            try:
                processor = AutoProcessor.from_pretrained(checkpoint.folder)
                model = AutoModelForImageTextToText.from_pretrained(
                    checkpoint.folder,
                    dtype=placement.dtype,
                    attn_implementation=placement.attention,
                    device_map=str(placement.device),
                )
            except torch.OutOfMemoryError as exc:
                raise ModelLoadError(
                    f"not enough memory on {placement.device} to load {name!r}: free the device, or set MEDMO_MODEL "
                    "to a smaller model (MBZUAI/MedMO-4B-Next) or MEDMO_DEVICE to another device"
                ) from exc
            # Whatever else stops the load (OSError, ValueError, safetensors' error for a damaged shard...)
            # is one sentence too.
            except Exception as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise ModelLoadError(
                    f"could not load model {name!r} from {checkpoint.folder} ({reason}): set MEDMO_MODEL to a "
                    "folder holding MedMO's weights, or to a hub id"
                ) from exc
        return cls.serving(model, processor, settings, placement, name=name, revision=settings.revision)

    @classmethod
    def serving(
        cls,
        model: Any,
        processor: Any,
        settings: Settings,
        placement: Placement,
        *,
        name: str,
        revision: str | None = None,
    ) -> ModelRuntime:
        """A runtime for a model and processor already on `placement`, however they were made."""
        model.eval()
        description = RuntimeDescription(
            model=name,
            revision=revision,
            device=str(placement.device),
            dtype=str(placement.dtype).removeprefix("torch."),
            attn_implementation=placement.attention,
        )
        return cls(
            model,
            processor,
            description=description,
            min_pixels=settings.min_pixels,
            max_pixels=settings.max_pixels,
            system_prompt=settings.system_prompt,
        )

    def prepare(
        self, conversation: Conversation, options: GenerationOptions, *, max_pixels: int | None = None
    ) -> PreparedRequest:
        """Resize and tokenize a conversation of any number of images (none too). Safe to call from many
        threads while the model runs. `max_pixels` lowers MEDMO_MAX_PIXELS for this request's images, so
        that several images share the context (`app.engine.request.image_area`)."""
        largest = self.max_pixels if max_pixels is None else min(self.max_pixels, max_pixels)
        smallest = min(self.min_pixels, largest)
        pictures = [self._resized(picture, smallest, largest) for picture in conversation.pictures]
        with self._processor_lock:
            text = self.processor.apply_chat_template(
                self._messages(conversation), tokenize=False, add_generation_prompt=True
            )
            features = self.processor(text=[text], images=pictures or None, return_tensors="pt")
        tensors = {key: value for key, value in features.items() if isinstance(value, torch.Tensor)}
        grids = tensors.get("image_grid_thw")
        # The model's own rope index (it reads only the config), computed here so that no engine spends its
        # device thread on it. A text-only prompt has no grid: its positions are plain counts.
        positions, deltas = self.model.model.get_rope_index(
            tensors["input_ids"], mm_token_type_ids=tensors["mm_token_type_ids"], image_grid_thw=grids
        )
        sizes = tuple(
            (int(width) * self.patch_size, int(height) * self.patch_size)
            for _, height, width in (grids.tolist() if grids is not None else [])
        )
        return PreparedRequest(
            features=tensors,
            model_input_sizes=sizes,
            options=options,
            rope_positions=positions[:, 0],
            rope_delta=int(deltas.view(-1)[0]),
        )

    def _messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        """The conversation in transformers' chat format; MEDMO_SYSTEM_PROMPT goes first unless it brings
        a system turn of its own. Pictures are placeholders here: the processor gets them resized."""
        messages: list[dict[str, Any]] = []
        if self.system_prompt and not any(turn.role == "system" for turn in conversation.turns):
            messages.append({"role": "system", "content": self.system_prompt})
        for turn in conversation.turns:
            if turn.role != "user" and all(isinstance(part, str) for part in turn.parts):
                # System and assistant turns as plain strings, the form every chat template reads.
                messages.append({"role": turn.role, "content": "".join(str(part) for part in turn.parts)})
                continue
            content = [
                {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"}
                for part in turn.parts
            ]
            messages.append({"role": turn.role, "content": content})
        return messages

    def _resized(self, picture: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
        """qwen-vl-utils' own resizing (sides to multiples of 32, area within min/max pixels). It is only
        ever handed a decoded PIL image: given a string it would open local paths and fetch URLs."""
        width, height = picture.size
        side = self.patch_size * self.merge_size
        if min(smart_resize(height, width, side, min_pixels, max_pixels)) < side:
            # qwen-vl-utils would make a side of 0 pixels: an image too elongated for the area it is fed.
            raise UnusableImageError(
                f"the image is too elongated for the area the model is fed ({max_pixels} pixels, "
                f"MEDMO_MAX_PIXELS={self.max_pixels}): its shorter side would be under {side} pixels"
            )
        resized = fetch_image(
            {"image": picture, "min_pixels": min_pixels, "max_pixels": max_pixels},
            image_patch_size=self.patch_size,
        )
        assert isinstance(resized, Image.Image)
        return resized

    def answer_tokens(self, answer: str) -> tuple[int, ...]:
        """The tokens of `answer` written as the model's whole reply: its text, then the end of the turn."""
        with self._processor_lock:
            tokens = self.processor.tokenizer.encode(answer, add_special_tokens=False)
        return (*tokens, self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))

    def constrained(self, request: PreparedRequest, constraint: Constraint) -> PreparedRequest:
        """The request, answered in the language of `constraint` (compiled once per distinct constraint;
        ConstraintError if the grammar library refuses it)."""
        compiled: CompiledGrammar = self.grammars.compile(constraint)
        return replace(request, options=replace(request.options, constraint=compiled))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated tokens, as MedMO's quick start decodes them (special tokens skipped). Called on the
        event loop for every streamed token: it never waits for the processor's lock, which a preparation
        thread may hold for a whole image."""
        return str(
            self._decoder.decode(
                list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def generate(self, batch: Sequence[PreparedRequest]) -> list[Generation]:
        """Run the requests as one generate() call; results come back in the same order.

        Requests may ask for different numbers of tokens: the call runs to the largest, and each request keeps
        its own first tokens. Greedy decoding gives exactly what each would have generated alone; so do
        seeded sampling and constraints, which choose each row's tokens by its own rules
        (`app.engine.sampling`) inside the call. Scoring requests are scored, one after the other.
        """
        if not batch:
            return []
        if len({item.options.group for item in batch}) > 1:
            raise ValueError("requests of different groups cannot share a generate() call")
        generating = [item for item in batch if item.options.continuations is None]
        generated = iter(self._generate(generating) if generating else [])
        return [
            self._scored(item) if item.options.continuations is not None else next(generated)
            for item in batch
        ]

    def _generate(self, batch: Sequence[PreparedRequest]) -> list[Generation]:
        inputs = collate([item.features for item in batch], self.pad_token_id)
        device = self.model.device
        inputs = {key: value.to(device) for key, value in inputs.items()}
        # Every rule set here, none left for the checkpoint's generation_config.json to fill: transformers
        # fills what a config leaves unset from it, and a checkpoint's repetition penalty would then apply to
        # greedy decoding here and nowhere else. Each request's own rules are RuledChoice's.
        config = GenerationConfig(
            do_sample=False,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=max(item.options.max_new_tokens for item in batch),
            eos_token_id=sorted(self.eos_token_ids),
            pad_token_id=self.pad_token_id,
        )
        ruled = (
            RuledChoice(batch, self.model.lm_head.out_features, device, self.eos_token_ids)
            if any(needs_rules(item.options) for item in batch)
            else None
        )
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, generation_config=config, logits_processor=[ruled] if ruled else None
                )
        except torch.OutOfMemoryError:
            # Give the cached blocks back so that the smaller batches the caller retries with can fit.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        return [
            self.finish(
                item,
                row[: item.options.max_new_tokens],
                ruled.logprobs_of(index) if ruled and item.options.logprobs is not None else None,
            )
            for index, (item, row) in enumerate(zip(batch, new_tokens, strict=True))
        ]

    def _scored(self, request: PreparedRequest) -> Generation:
        from app.engine.scoring import score_continuations

        assert request.options.continuations is not None
        scores = score_continuations(self.model, request, request.options.continuations)
        return Generation(
            text="", token_ids=(), prompt_tokens=request.prompt_tokens, finish_reason="stop", scores=scores
        )

    def finish(
        self,
        request: PreparedRequest,
        tokens: Iterable[int],
        logprobs: Sequence[TokenLogprobs] | None = None,
    ) -> Generation:
        """The generation a request's tokens make: up to and including its end-of-turn token, as text, with
        as many of the alternatives beside each token as the request asked for."""
        kept: list[int] = []
        reason: FinishReason = "length"
        for token in tokens:
            kept.append(token)
            if token in self.eos_token_ids:
                reason = "stop"
                break
        text = self.decode(kept)
        asked = request.options.logprobs
        return Generation(
            text=text,
            token_ids=tuple(kept),
            prompt_tokens=request.prompt_tokens,
            finish_reason=reason,
            logprobs=tuple(TokenLogprobs(item.logprob, item.top[:asked]) for item in logprobs[: len(kept)])
            if logprobs is not None and asked is not None
            else None,
        )


class RuledChoice:
    """A logits processor that chooses each row's token inside `generate()` by the row's own rules
    (`app.engine.sampling.choose`: sampling, penalty, constraint), then leaves only that token possible, so
    that generate()'s own greedy step takes it. It records the log-probabilities the rows asked for."""

    def __init__(
        self, batch: Sequence[PreparedRequest], vocabulary: int, device: torch.device, eos: frozenset[int]
    ) -> None:
        self.rules = RowRules(len(batch), vocabulary, device)
        for row, item in enumerate(batch):
            self.rules.set(row, item.options, item.features["input_ids"][0])
        self.matchers: list[TokenMatcher | None] = [
            item.options.constraint.matcher() if item.options.constraint is not None else None
            for item in batch
        ]
        self._masks = torch.full((len(batch), bitmask_words(vocabulary)), -1, dtype=torch.int32)
        self._sample = any(samples(item.options) for item in batch)
        self._asked = [item.options.logprobs for item in batch]
        self._eos = eos
        self._done = [False] * len(batch)
        self._prompt: int | None = None
        self._logprobs: list[list[TokenLogprobs]] = [[] for _ in batch]

    def logprobs_of(self, row: int) -> list[TokenLogprobs]:
        return self._logprobs[row]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._prompt is None:
            self._prompt = int(input_ids.shape[1])
        elif input_ids.shape[1] > self._prompt:
            # The token each row took in the previous step; rows that ended take padding from then on.
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if self._done[row]:
                    continue
                if token in self._eos:
                    self._done[row] = True
                elif (matcher := self.matchers[row]) is not None:
                    matcher.accept(token)
        for row, matcher in enumerate(self.matchers):
            if matcher is not None and not self._done[row]:
                matcher.fill(self._masks, row)
        if any(matcher is not None for matcher in self.matchers):
            self.rules.bitmask.copy_(self._masks)
        tokens = choose(scores[:, : self.rules.vocabulary], self.rules, sample=self._sample)
        for row, top in enumerate(self._asked):  # only the rows that asked for them
            if top is not None and not self._done[row]:
                ids = self.rules.top_ids[row, :top].tolist()
                values = self.rules.top_logprobs[row, :top].tolist()
                self._logprobs[row].append(
                    TokenLogprobs(float(self.rules.logprob[row]), tuple(zip(ids, values, strict=True)))
                )
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, tokens.view(-1, 1), 0.0)


def is_fatal_error(exc: BaseException) -> bool:
    """Errors after which the device cannot be trusted (illegal address, device-side assert): no retry."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return accelerator_error is not None and isinstance(exc, accelerator_error)


def _torch_build() -> str:
    if torch.version.hip:
        return f"torch {torch.__version__} for ROCm {torch.version.hip}"
    if torch.version.cuda:
        return f"torch {torch.__version__} for CUDA {torch.version.cuda}"
    return f"torch {torch.__version__}, a CPU-only build"
