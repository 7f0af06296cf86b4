"""Typed access to what the app holds, for the routes."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from app.api.errors import ApiError
from app.api.keys import ApiKeys
from app.api.middleware import Accepted
from app.api.uploads import Slots
from app.engine.protocol import Engine
from app.engine.request import GenerationOptions, Priority
from app.engine.runtime import Runtime
from app.metrics import Metrics
from app.settings import Settings
from app.startup.progress import StartupProgress
from app.text.fence import TextFence


@dataclass
class Service:
    settings: Settings
    api_keys: ApiKeys
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    engine: Engine | None = None
    prepare_pool: ThreadPoolExecutor | None = None
    startup_error: str | None = None
    uploads: Slots = field(init=False)  # counted apart from the queue for the model
    accepted: Accepted = field(init=False)  # every request in progress, for a drain
    # Previews take places in the queue and decode on the preparation threads, as tasks do: at most half of
    # either, so that a flood of previews never leaves a request for the model without room.
    previews: Slots = field(init=False)
    preview_decodes: asyncio.Semaphore = field(init=False)
    _text_fence: TextFence | None = field(init=False, default=None)
    # The phase a start is in (downloading, loading, warming up), for /readyz.
    startup: StartupProgress = field(init=False)

    def __post_init__(self) -> None:
        self.uploads = Slots(
            self.settings.max_uploads, self.metrics, what="uploads", gauge=self.metrics.uploads_in_progress
        )
        self.accepted = Accepted()
        self.previews = Slots(max(1, self.settings.max_queue // 2), self.metrics, what="previews")
        self.preview_decodes = asyncio.Semaphore(max(1, self.settings.prepare_workers // 2))
        self.startup = StartupProgress(interval_s=self.settings.progress_interval_s)

    def text_fence(self, runtime: Runtime) -> TextFence:
        """The fence for the loaded model's control tokens, made once."""
        if self._text_fence is None:
            self._text_fence = TextFence(runtime.control_tokens, self.settings.max_prompt_chars)
        return self._text_fence

    def options(
        self,
        task: str,
        requested: int | None = None,
        *,
        logprobs: bool | None = None,
        priority: Priority = Priority.ROUTINE,
    ) -> GenerationOptions:
        """Generation options for a request: the server's limit for its task, or fewer tokens if it asks;
        with `logprobs`, each chosen token's log-probability comes back too."""
        limit = self.settings.max_new_tokens(task)
        if requested is not None and requested > limit:
            raise ApiError(
                422,
                "invalid_request",
                f"max_new_tokens: at most {limit} for {task} on this server (MEDMO_{task.upper()}_MAX_NEW_TOKENS)",
            )
        return GenerationOptions(
            max_new_tokens=requested or limit, group=task, logprobs=0 if logprobs else None, priority=priority
        )


def get_service(request: Request) -> Service:
    service = request.app.state.service
    assert isinstance(service, Service)
    return service


@dataclass(frozen=True)
class Running:
    """A service whose model is loaded and whose engine and preparation threads are started."""

    service: Service
    runtime: Runtime
    engine: Engine
    prepare_pool: ThreadPoolExecutor

    @property
    def text_fence(self) -> TextFence:
        return self.service.text_fence(self.runtime)


def get_running(request: Request) -> Running:
    """The running service, or a 503 while the model is not loaded."""
    service = get_service(request)
    if service.runtime is None or service.engine is None or service.prepare_pool is None:
        raise ApiError(503, "unavailable", "the model is not loaded yet")
    return Running(service, service.runtime, service.engine, service.prepare_pool)
