"""Typed access to what the app holds, for the routes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from app.api.errors import ApiError
from app.api.keys import ApiKeys
from app.engine.batcher import Batcher
from app.engine.runtime import Generation, GenerationOptions, PreparedRequest, Runtime
from app.metrics import Metrics
from app.schemas import TaskName
from app.settings import Settings

TaskBatcher = Batcher[PreparedRequest, Generation]


@dataclass
class Service:
    settings: Settings
    api_keys: ApiKeys
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    batcher: TaskBatcher | None = None
    prepare_pool: ThreadPoolExecutor | None = None
    startup_error: str | None = None

    def options(self, task: TaskName) -> GenerationOptions:
        limits = {
            "vqa": self.settings.vqa_max_new_tokens,
            "report": self.settings.report_max_new_tokens,
            "ground": self.settings.ground_max_new_tokens,
        }
        return GenerationOptions(max_new_tokens=limits[task])


def get_service(request: Request) -> Service:
    service = request.app.state.service
    assert isinstance(service, Service)
    return service


@dataclass(frozen=True)
class Running:
    """A service whose model is loaded and whose batcher and preparation threads are started."""

    service: Service
    runtime: Runtime
    batcher: TaskBatcher
    prepare_pool: ThreadPoolExecutor


def get_running(request: Request) -> Running:
    """The running service, or a 503 while the model is not loaded."""
    service = get_service(request)
    if service.runtime is None or service.batcher is None or service.prepare_pool is None:
        raise ApiError(503, "unavailable", "the model is not loaded yet")
    return Running(service, service.runtime, service.batcher, service.prepare_pool)
