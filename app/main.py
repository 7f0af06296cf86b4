"""The app factory and its lifespan: load the model once, start the engine, stop cleanly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial

import torch
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__
from app.api import chat, chat_models, dicomweb, ops, tasks, viewer
from app.api.browsers import install_browser_protections
from app.api.deps import Service
from app.api.docs import ASSETS_URL, install_docs
from app.api.errors import install_error_handlers
from app.api.keys import ApiKeys
from app.api.middleware import RequestContextMiddleware
from app.api.openapi import MedmoAPI
from app.engine.build import build_engine
from app.engine.protocol import Engine
from app.engine.runtime import ModelLoadError, ModelRuntime, Runtime
from app.metrics import Metrics
from app.settings import Settings, get_settings
from app.startup.progress import Phase
from app.tasks import TASKS

logger = logging.getLogger("medmo.startup")

DESCRIPTION = """\
Medical visual question answering, radiology reports and grounding from MedMO, a medical
vision-language model built on Qwen3-VL. Send an image (PNG, JPEG, TIFF, BMP, WebP) as
multipart/form-data in field `image`, or base64 in JSON, with the task's text fields.
"""


EngineFactory = Callable[[Settings, Runtime, Metrics], Engine]


def create_app(
    settings: Settings | None = None,
    runtime: Runtime | None = None,
    engine_factory: EngineFactory | None = None,
) -> FastAPI:
    """Build the app. With `runtime` given, that runtime is served instead of loading MEDMO_MODEL; the
    engine around it is made at startup by `engine_factory` (by default the one MEDMO_ENGINE names, its
    warm-up shown as startup progress)."""
    settings = settings or get_settings()
    service = Service(settings=settings, api_keys=ApiKeys.from_settings(settings), runtime=runtime)
    app = MedmoAPI(
        title="MedMO Serve",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        upload_fields=(*(task.fields for task in TASKS.values()), viewer.PreviewFields),
        body_models=(chat_models.ChatCompletionRequest, *dicomweb.REQUEST_MODELS.values()),
        # Served by install_docs from files in the package instead of FastAPI's CDN-loading pages.
        docs_url=None,
        redoc_url=None,
        # No redirect from /vqa/ to /vqa: its Location would be built from the client's Host header.
        redirect_slashes=False,
    )
    app.state.service = service
    app.state.engine_factory = engine_factory
    install_error_handlers(app)
    app.include_router(tasks.router)
    app.include_router(dicomweb.router)
    app.include_router(chat.router)
    app.include_router(viewer.router)
    app.mount(viewer.ASSETS_PATH, viewer.assets(), name="viewer-assets")
    app.include_router(ops.probes)
    app.include_router(ops.router)
    install_docs(app)
    install_browser_protections(app, settings, cacheable_paths=(viewer.ASSETS_PATH, ASSETS_URL))
    app.add_middleware(RequestContextMiddleware, metrics=service.metrics, accepted=service.accepted)
    app.add_middleware(StartupFailureReporter, service=service)
    return app


def create_probe_app(app: FastAPI) -> FastAPI:
    """/healthz and /readyz alone, about `app`'s service: for a probe port of their own."""
    probe_app = FastAPI(
        title="MedMO Serve probes", openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False
    )
    probe_app.state.service = app.state.service
    probe_app.include_router(ops.probes)
    return probe_app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    service = app.state.service
    assert isinstance(service, Service)
    settings = service.settings
    startup = service.startup
    try:
        runtime = service.runtime
        if runtime is None:
            loaded = await asyncio.to_thread(ModelRuntime.load, settings, startup)
            runtime = service.runtime = loaded
        # The KV cache, and on a GPU the decode graphs: minutes for a large model, shown like the loading.
        with startup.phase(
            Phase.WARMING_UP,
            began=f"warming up the {settings.engine} engine",
            ended=f"warmed up the {settings.engine} engine",
            engine=settings.engine,
        ):
            factory = app.state.engine_factory or partial(
                build_engine, on_graph_captured=startup.counter("capturing decode graphs", "graphs")
            )
            engine = factory(settings, runtime, service.metrics)
            await engine.start()
    except ModelLoadError as exc:
        service.startup_error = str(exc)
        raise
    if not service.api_keys.enabled:
        logger.warning(
            "NO API KEYS CONFIGURED: every route is open to anyone who can reach this port. "
            "Set MEDMO_API_KEYS or MEDMO_API_KEY_FILE."
        )
    service.prepare_pool = ThreadPoolExecutor(
        settings.prepare_workers, thread_name_prefix="medmo-prepare", initializer=_single_threaded_torch
    )
    service.engine = engine
    logger.info("serving with the %s engine", engine.name)
    try:
        yield
    finally:
        await engine.stop()
        service.prepare_pool.shutdown(wait=False, cancel_futures=True)


def _single_threaded_torch() -> None:
    """Preparation threads run torch's CPU ops (resize, normalise) without an OpenMP team of their own.

    Each thread that runs torch ops gets a team as large as the machine; a few such teams oversubscribe
    the cores, and then every thread, the one driving generate() included, waits on descheduled workers.
    Parallelism across requests comes from the pool itself.
    """
    torch.set_num_threads(1)


async def drain(app: FastAPI, grace_s: float) -> bool:
    """Refuse new work (503, /readyz too) and wait for every accepted request to end, whatever it is doing
    (`middleware.Accepted`); those still running when the grace runs out are cut short with a 503. False
    if some were."""
    service = app.state.service
    assert isinstance(service, Service)
    finished = await service.accepted.drain(grace_s)
    if service.engine is not None:
        service.engine.begin_drain()  # nothing is left in it: every request in it was an accepted one
    return finished


class StartupFailureReporter:
    """Report a model that cannot load as the one sentence saying why, not as a traceback.

    uvicorn prints whatever message the lifespan sends with `lifespan.startup.failed`; Starlette sends the
    formatted traceback. The sentence was already written for an operator, so it replaces it.
    """

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_concisely(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and self.service.startup_error:
                message = {**message, "message": self.service.startup_error}
            await send(message)

        await self.app(scope, receive, send_concisely)
