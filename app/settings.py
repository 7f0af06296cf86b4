"""Service configuration: one pydantic-settings class, read from MEDMO_* variables, checked at startup."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.pacs.dicomweb import read_credentials
from app.schemas import BoxConvention
from app.tasks import TASKS

MIB = 1024 * 1024
# Tokens of chat template and instructions around the image, for the context check at startup.
PROMPT_ALLOWANCE = 128


class _Settings(BaseSettings):
    """Everything an operator can set. Environment variables are the field names upper-cased with MEDMO_.

    Each task's token limit (MEDMO_VQA_MAX_NEW_TOKENS, ...) is added from the task's own declaration; read
    it with `max_new_tokens(task)`.
    """

    model_config = SettingsConfigDict(env_prefix="MEDMO_", extra="ignore", frozen=True)

    # --- model ---
    model: str = Field(
        "MBZUAI/MedMO-8B-Next",
        min_length=1,
        description="Hugging Face hub id or local folder of a MedMO (Qwen3-VL) checkpoint.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (ROCm builds of torch also use cuda).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on the CPU."
    )
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="auto: flash_attention_2 when importable on a GPU, else sdpa."
    )
    system_prompt: str | None = Field(
        None, description="Optional system message put before every request (MedMO's quick start uses none)."
    )

    # --- what the model sees ---
    min_pixels: int = Field(256 * 256, ge=32 * 32, description="Smallest image area fed to the model.")
    max_pixels: int = Field(
        1280 * 1280,
        ge=32 * 32,
        description="Largest image area fed to the model (MedMO trained at 1280x1280).",
    )
    chat_max_new_tokens: int = Field(
        1024,
        ge=1,
        le=8192,
        description="Generation limit for /v1/chat/completions; max_tokens may ask for fewer.",
    )
    box_convention: BoxConvention = Field(
        "pixel",
        description="How the model writes boxes: pixel = absolute pixels of the model's input image (MedMO); "
        "rel1000 = 0-1000 relative scale (base Qwen3-VL).",
    )

    # --- limits on what clients send ---
    max_upload_bytes: int = Field(
        64 * MIB,
        ge=1024,
        description="Largest accepted image file, in bytes; a request's images together are held to it too.",
    )
    max_dicom_frames: int = Field(
        10_000, ge=1, description="Most frames a DICOM object may declare; more is refused with 413."
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1024,
        description="Largest decoded image area; more is treated as a decompression bomb.",
    )
    max_prompt_chars: int = Field(
        20_000,
        ge=100,
        le=1_000_000,
        description="Most characters of client text one request puts in the prompt (fields, captions, chat "
        "messages together); more get 422 before anything is tokenized.",
    )
    max_messages: int = Field(64, ge=1, le=10_000, description="Most messages in one chat conversation.")
    max_images: int = Field(
        8,
        ge=1,
        le=64,
        description="Most images in one request (a study's views, slices, a prior); more get 413. At most "
        "MEDMO_MAX_QUEUE: grounding several images takes a place in the queue for each.",
    )
    max_n: int = Field(
        4,
        ge=1,
        le=16,
        description="Most answers one chat request may ask for (n); more get 400. Each answer takes a place in "
        "the queue: set above MEDMO_MAX_QUEUE, the service does not start; left unset, it is lowered to it.",
    )
    max_total_pixels: int = Field(
        100_000_000,
        ge=1024,
        description="Largest decoded area of a request's images together; more gets 413. Bounds the memory "
        "one request's images hold, as MEDMO_MAX_IMAGE_PIXELS does for each.",
    )

    # --- the engine ---
    engine: Literal["continuous", "generate"] = Field(
        "continuous",
        description="continuous: requests join and leave the running batch at every step (KV cache slots, "
        "graph-captured decode on a GPU). generate: whole batches through transformers' generate(), the "
        "reference path.",
    )
    max_slots: int | None = Field(
        None,
        ge=1,
        le=256,
        description="continuous: requests decoded together, each with a KV cache slot of MEDMO_MAX_CONTEXT "
        "tokens. Unset: as many as fit in MEDMO_GPU_MEMORY_FRACTION of the GPU (8 on the CPU).",
    )
    max_context: int = Field(
        4096,
        ge=256,
        le=65536,
        description="Most tokens per request, images and prompt and answer together (the continuous engine "
        "holds this many per slot). The images of a request of several are fed at a smaller size where "
        "needed, so that together they leave room for the answer.",
    )
    prefill_token_budget: int = Field(
        8192,
        ge=1,
        description="continuous: most prompt tokens started in one step; a burst of new requests is spread "
        "over several steps so that running ones keep decoding.",
    )
    decode_graphs: bool = Field(
        True, description="continuous, on a GPU: capture the decode step as CUDA/HIP graphs at startup."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="continuous: run the decode step through torch.compile (fused kernels, fewer launches) "
        "before capturing it; auto: on a GPU. Each bucket compiles at startup; TORCHINDUCTOR_CACHE_DIR keeps "
        "the kernels for the next start (the images put it on the model cache volume).",
    )
    allow_eager: bool = Field(
        False,
        description="continuous, on a GPU: when the decode graphs cannot be captured, serve eagerly (much "
        "slower) instead of stopping the start with the reason.",
    )
    gpu_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="continuous, with MEDMO_MAX_SLOTS unset: the share of the GPU's memory the service may fill.",
    )
    max_batch_size: int = Field(
        16, ge=1, le=512, description="generate: most requests in one generate() call."
    )
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        description="generate: how long a batch waits for more requests after its first one arrives.",
    )
    max_queue: int = Field(256, ge=1, description="Requests admitted and waiting; more are refused with 429.")
    stat_reserve: int | None = Field(
        None,
        ge=0,
        description="Places of MEDMO_MAX_QUEUE kept for stat requests: a queue full of routine and urgent work "
        "refuses them with 429 and still takes an emergency. Unset: a sixteenth of MEDMO_MAX_QUEUE.",
    )
    priority_aging_s: float = Field(
        60.0,
        gt=0,
        description="A waiting request climbs one priority (routine, urgent, stat) for every this many seconds "
        "it has waited, so that a steady stream of stat work never starves routine work.",
    )
    prepare_workers: int = Field(
        4,
        ge=1,
        le=64,
        description="Threads decoding and preprocessing uploads while the model runs. More than a few only "
        "compete with generate() for the interpreter lock and slow every batch down.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Deadline per request (clients may lower it with X-Request-Timeout)."
    )
    shutdown_grace_s: float = Field(
        60.0, ge=0, description="On SIGTERM, how long accepted requests may take to finish."
    )

    # --- access ---
    api_keys: SecretStr | None = Field(
        None, description="Comma-separated API keys clients must send (Bearer or X-API-Key); unset: open."
    )
    api_key_file: Path | None = Field(
        None, description="File with one API key per line ('#' comments); re-read when it changes."
    )
    metrics_require_key: bool = Field(False, description="Require an API key for /metrics too.")

    # --- browsers ---
    allowed_hosts: str | None = Field(
        None,
        description="Comma-separated host names the service answers to (the Host header; '*.example.org' "
        "for subdomains); others get 400. Unset: any host.",
    )
    cors_origins: str | None = Field(
        None,
        description="Comma-separated origins (https://viewer.example.org) whose pages may call the service from "
        "a browser. Unset: none, so a page elsewhere cannot read an answer or send a key.",
    )

    # --- the PACS, over DICOMweb (the /dicomweb/... routes) ---
    dicomweb_url: str | None = Field(
        None,
        description="Base URL of the PACS's DICOMweb service, e.g. http://orthanc:8042/dicom-web: the /dicomweb/"
        "... routes fetch images from it (WADO-RS) and store answers into it (STOW-RS). Unset: they answer 503.",
    )
    dicomweb_credentials_file: Path | None = Field(
        None,
        description="File holding the PACS login: 'user:password' (HTTP Basic) or 'Bearer <token>' on its first "
        "line; re-read at every call.",
    )
    dicomweb_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest one call to the PACS may take, connecting to last byte."
    )
    dicomweb_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Further tries of a PACS call that could not connect or was answered 502, 503 or 504.",
    )
    fhir_url: str | None = Field(
        None,
        description="Base URL of the FHIR server (R4) the DICOMweb routes also send each answer's bundle to, "
        "e.g. https://fhir.example.org/fhir, with the PACS's timeout, retries and no redirects. Unset: none is "
        "sent.",
    )
    fhir_credentials_file: Path | None = Field(
        None,
        description="File holding the FHIR server's login, as MEDMO_DICOMWEB_CREDENTIALS_FILE holds the PACS's.",
    )

    # --- HTTP ---
    upload_timeout_s: float = Field(
        60.0, gt=0, description="Time allowed to receive a request's body; slower uploads get 408."
    )
    min_upload_bytes_per_s: int = Field(
        16_384,
        ge=1,
        description="After its first 5 s, an upload slower than this on average gets 408 (a stalled client "
        "is cut off without waiting for the upload timeout).",
    )
    max_uploads: int = Field(
        64, ge=1, description="Uploads received at once; more get 429. Counted apart from MEDMO_MAX_QUEUE."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open connections uvicorn accepts before answering 503 itself."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time allowed for a request's head to arrive; slower connections are closed."
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port.")
    probe_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="A port of their own for /healthz and /readyz, answering when the main port is full.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    progress_interval_s: float = Field(
        10.0,
        gt=0,
        description="When the log is not a terminal: seconds between the progress lines of a long startup "
        "phase (downloading, loading, warming up).",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_keys(value.get_secret_value().split(","))
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: str | None) -> str | None:
        # Starlette's TrustedHostMiddleware takes names, and a leading "*." for subdomains only.
        if value is None:
            return None
        for host in (part.strip() for part in value.split(",")):
            if not host or ("*" in host and not (host.startswith("*.") and "*" not in host[2:])):
                raise ValueError(f"{host[:64]!r} is not a host name, or *.name for its subdomains")
        return value

    @field_validator("dicomweb_url", "fhir_url")
    @classmethod
    def _service_base(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL, e.g. http://orthanc:8042/dicom-web")
        if parts.query or parts.fragment:
            raise ValueError("must be a base URL, without a query or fragment")
        if parts.username or parts.password:
            service = str(info.field_name).removesuffix("_url").upper()
            raise ValueError(f"must not hold a login: put it in MEDMO_{service}_CREDENTIALS_FILE")
        return value.rstrip("/")

    @field_validator("dicomweb_credentials_file", "fhir_credentials_file")
    @classmethod
    def _readable_credentials(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_credentials(value)  # the message names the problem, never the content
        return value

    @model_validator(mode="after")
    def _consistent(self) -> _Settings:
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"MEDMO_MIN_PIXELS ({self.min_pixels}) is larger than MEDMO_MAX_PIXELS ({self.max_pixels})"
            )
        longest_answer = max(self.chat_max_new_tokens, *(self.max_new_tokens(task) for task in TASKS))
        image_tokens = self.max_pixels // (32 * 32)
        if (
            self.engine == "continuous"
            and image_tokens + longest_answer + PROMPT_ALLOWANCE > self.max_context
        ):
            raise ValueError(
                f"MEDMO_MAX_CONTEXT ({self.max_context}) cannot hold the largest image ({image_tokens} tokens at "
                f"MEDMO_MAX_PIXELS), a prompt and the longest answer ({longest_answer} tokens): raise it to at "
                f"least {image_tokens + longest_answer + PROMPT_ALLOWANCE}"
            )
        if self.max_queue < self.max_images:
            raise ValueError(
                f"MEDMO_MAX_QUEUE ({self.max_queue}) is smaller than MEDMO_MAX_IMAGES ({self.max_images}): "
                "grounding several images takes a place in the queue for each"
            )
        if self.stat_reserve is not None and self.stat_reserve >= self.max_queue:
            raise ValueError(
                f"MEDMO_STAT_RESERVE ({self.stat_reserve}) leaves no place of MEDMO_MAX_QUEUE ({self.max_queue}) "
                "for routine work: lower it"
            )
        if "max_n" in self.model_fields_set and self.max_queue < self.max_n:
            raise ValueError(
                f"MEDMO_MAX_QUEUE ({self.max_queue}) is smaller than MEDMO_MAX_N ({self.max_n}): each answer "
                "of a chat request takes a place in the queue"
            )
        if self.max_wait_ms / 1000 >= self.request_timeout_s:
            raise ValueError(
                f"MEDMO_MAX_WAIT_MS ({self.max_wait_ms}) must be shorter than MEDMO_REQUEST_TIMEOUT_S "
                f"({self.request_timeout_s} s): a batch would wait past every deadline"
            )
        return self

    @property
    def most_choices(self) -> int:
        """The most answers (n) a chat request may ask for: MEDMO_MAX_N, within MEDMO_MAX_QUEUE."""
        return min(self.max_n, self.max_queue)

    @property
    def places_for_stat(self) -> int:
        """MEDMO_STAT_RESERVE, or a sixteenth of the queue."""
        return self.max_queue // 16 if self.stat_reserve is None else self.stat_reserve

    def max_new_tokens(self, task: str) -> int:
        """The generation limit of a task (MEDMO_<TASK>_MAX_NEW_TOKENS)."""
        return int(getattr(self, f"{task}_max_new_tokens"))


def _task_limits() -> dict[str, Any]:
    return {
        f"{task.name}_max_new_tokens": (
            int,
            Field(
                task.default_max_new_tokens,
                ge=1,
                le=8192,
                description=task.limit_means.format(name=task.name),
            ),
        )
        for task in TASKS.values()
    }


if TYPE_CHECKING:
    Settings = _Settings
else:
    Settings = create_model("Settings", __base__=_Settings, __module__=__name__, **_task_limits())


MIN_KEY_LENGTH = 16


def check_keys(keys: list[str]) -> list[str]:
    """Keys as given, stripped; a short key is refused: it can be guessed."""
    cleaned = [key.strip() for key in keys if key.strip()]
    if any(len(key) < MIN_KEY_LENGTH for key in cleaned):
        raise ValueError(f"every API key must be at least {MIN_KEY_LENGTH} characters long")
    return cleaned


def describe_validation_error(error: ValidationError) -> str:
    """One line an operator can act on, naming the environment variable rather than the Python field."""
    problems = []
    for item in error.errors():
        where = "MEDMO_" + "_".join(str(part) for part in item["loc"]).upper() if item["loc"] else "settings"
        problems.append(f"{where}: {item['msg']}")
    return "invalid configuration: " + "; ".join(problems)


@lru_cache
def get_settings() -> Settings:
    return Settings()
