"""The engine MEDMO_ENGINE names, built around a loaded runtime and sized by the settings and the device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from app.engine.continuous import ContinuousEngine, Runner
from app.engine.generate import GenerateEngine
from app.engine.protocol import Engine
from app.engine.runtime import ModelLoadError, Runtime
from app.engine.slots import SlotCache, SlotRunner, fit_slots
from app.metrics import Metrics
from app.settings import Settings


def build_engine(
    settings: Settings,
    runtime: Runtime,
    metrics: Metrics,
    *,
    on_graph_captured: Callable[[int, int], None] | None = None,
) -> Engine:
    """The engine MEDMO_ENGINE names, around a loaded runtime. `on_graph_captured(captured, total)` follows
    the continuous engine's warm-up on a GPU."""
    if settings.engine == "generate":
        return generate_engine(settings, runtime, metrics)
    runner = build_runner(settings, runtime)
    runner.on_graph_captured = on_graph_captured
    return continuous_engine(settings, runner, runtime, metrics)


def generate_engine(settings: Settings, runtime: Runtime, metrics: Metrics) -> GenerateEngine:
    return GenerateEngine(
        runtime,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.max_queue,
        metrics=metrics,
        stat_reserve=settings.places_for_stat,
        priority_aging_s=settings.priority_aging_s,
    )


def continuous_engine(
    settings: Settings, runner: Runner, runtime: Runtime, metrics: Metrics
) -> ContinuousEngine:
    return ContinuousEngine(
        runner,
        runtime,
        max_queue=settings.max_queue,
        prefill_token_budget=settings.prefill_token_budget,
        metrics=metrics,
        stat_reserve=settings.places_for_stat,
        priority_aging_s=settings.priority_aging_s,
    )


def build_runner(settings: Settings, runtime: Runtime) -> SlotRunner:
    """The slot KV cache and decode steps for the runtime's model, sized by the settings and the device."""
    model = runtime.model
    text_config = model.config.get_text_config()
    slots = settings.max_slots or fit_slots(
        text_config, model.dtype, model.device, settings.max_context, settings.gpu_memory_fraction
    )
    per_slot_gib = SlotCache.bytes_per_token(text_config, model.dtype) * settings.max_context / 1024**3
    if slots < 1:
        raise ModelLoadError(
            f"no room on {model.device} for the KV cache after loading the weights (one slot of "
            f"MEDMO_MAX_CONTEXT={settings.max_context} tokens takes {per_slot_gib:.2f} GiB): lower "
            "MEDMO_MAX_CONTEXT, raise MEDMO_GPU_MEMORY_FRACTION, or serve a smaller model"
        )
    try:
        return SlotRunner(
            model,
            slots=slots,
            context=settings.max_context,
            graphs=settings.decode_graphs,
            compiled=settings.compile == "on" or (settings.compile == "auto" and model.device.type == "cuda"),
            allow_eager=settings.allow_eager,
        )
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"not enough memory on {model.device} for {slots} KV cache slots of {settings.max_context} tokens "
            f"({slots * per_slot_gib:.1f} GiB): lower MEDMO_MAX_SLOTS or MEDMO_MAX_CONTEXT"
        ) from exc
