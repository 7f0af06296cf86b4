"""The continuous engine against the generate engine, on one mixed workload, in one run.

    python -m bench.engines --shape 8b                                   # GPU: MedMO-8B's shape, random weights
    python -m bench.engines --shape tiny --clients 1,4 --generate-clients 4 --duration 5   # CPU smoke run

Every request draws its task and its `max_new_tokens` (VQA 16-64, grounding 32-128, reports 128-512 by
default) and carries a 512x512 image. Three measurements, each on this machine in this run:

1. **Decode step ceiling**: the continuous engine's own decode step (graph replay on a GPU), timed alone for
   a few batch sizes with rows as long as a 512x512 prompt plus half an answer: the floor the served numbers
   are compared with.
2. **Offline**: the continuous engine in this process, fed the same prepared requests by closed-loop
   virtual clients, no HTTP: what the engine can do. Served divided by offline is the cost of the serving
   path (uploads, decoding, preprocessing, the event loop).
3. **Served**: `bench.server` (random weights built on the device) as a real process for each engine,
   closed-loop HTTP clients for --duration seconds per client count (--generate-duration for the generate
   engine, whose whole-batch answers take longest); useful tokens are the completion
   tokens of the 200 responses that ended inside the window.

Beside them, the serving path's CPU work per request (decoding the PNG upload, then resizing, the chat
template, the processor and the rope index, on one thread as the service's preparation threads run it),
set against the engine's fastest offline rate: how many threads' worth of preparation the GPU can use.

It prints one table, the ratios, and the aims of the continuous-batching work next to what was measured.
With --profile it also prints the top kernels of one decode step (torch.profiler).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import aclosing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.conversation import Conversation
from app.engine.build import build_runner, continuous_engine
from app.engine.protocol import Completed, Engine, TokenDelta
from app.engine.request import GenerationOptions, PreparedRequest
from app.imaging import ImageLimits, decode_image
from app.metrics import Metrics
from app.settings import Settings
from app.tasks.ground import GroundFields, ground_prompt
from app.tasks.report import ReportFields, report_prompt
from app.tiny_checkpoint import SHAPES
from bench.load import FIELDS, test_images
from bench.server import build_runtime
from bench.servers import serve

PROMPTS = {
    "vqa": FIELDS["vqa"]["question"],
    "report": report_prompt(ReportFields(**FIELDS["report"])),
    "ground": ground_prompt(GroundFields(), "pixel"),
}


@dataclass(frozen=True)
class Mix:
    """Per request: a task drawn uniformly, and max_new_tokens drawn uniformly in that task's range."""

    ranges: dict[str, tuple[int, int]]

    @classmethod
    def parse(cls, text: str) -> Mix:
        ranges = {}
        for part in text.split(","):
            task, span = part.split("=")
            low, high = span.split("-")
            ranges[task] = (int(low), int(high))
        return cls(ranges)

    def draw(self, rng: np.random.Generator) -> tuple[str, int]:
        task = str(rng.choice(sorted(self.ranges)))
        low, high = self.ranges[task]
        return task, int(rng.integers(low, high + 1))

    def limits(self) -> dict[str, int]:
        return {task: high for task, (_, high) in self.ranges.items()}


@dataclass
class Row:
    label: str
    clients: int
    tokens_per_s: float
    requests_per_s: float
    p50_s: float = float("nan")
    p99_s: float = float("nan")
    decode_step_ms: float = float("nan")
    failures: dict[int, int] = field(default_factory=dict)
    window_s: float = float("nan")  # how long it was counted

    @property
    def window_too_short(self) -> bool:
        """A window under three times the median latency counts the phases of a few batches, not a rate."""
        return self.window_s < 3 * self.p50_s


def settings_for(args: argparse.Namespace, engine: str, compile_step: str = "auto") -> dict[str, str]:
    mix = Mix.parse(args.mix)
    env = {
        "MEDMO_ENGINE": engine,
        "MEDMO_COMPILE": compile_step,
        "MEDMO_MAX_CONTEXT": str(args.context),
        "MEDMO_MAX_QUEUE": str(max(256, 4 * max(args.clients + args.generate_clients))),
        "MEDMO_MAX_BATCH_SIZE": str(args.generate_batch),
        "MEDMO_MAX_WAIT_MS": str(args.generate_wait_ms),
        "MEDMO_REQUEST_TIMEOUT_S": "3600",
        "MEDMO_LOG_LEVEL": "warning",
        "MEDMO_MIN_PIXELS": str(args.image_size**2),
        "MEDMO_MAX_PIXELS": str(args.image_size**2),
        **{f"MEDMO_{task.upper()}_MAX_NEW_TOKENS": str(limit) for task, limit in mix.limits().items()},
        # The chat route is not in the mix; its limit only has to fit the same context.
        "MEDMO_CHAT_MAX_NEW_TOKENS": str(max(mix.limits().values())),
    }
    if args.slots:
        env["MEDMO_MAX_SLOTS"] = str(args.slots)
    return env


# Words in the names of the kernels that SDPA may choose (flash, memory-efficient, cuDNN, the math path).
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "efficient", "attention", "cudnn", "sdpa")
# --compile: the MEDMO_COMPILE values to serve the continuous engine with, the first also in process.
COMPILE_MODES = {"on": ("on",), "off": ("off",), "both": ("on", "off")}


# --- 1 and 2: in this process ---


def prepared_pool(
    runtime: object, settings: Settings, mix: Mix, image_size: int, count: int
) -> tuple[list[PreparedRequest], float]:
    """`count` requests of the mix, each decoded from the PNG upload and prepared as the service does, and
    the median milliseconds that took per request on this one thread: the serving path's CPU work."""
    rng = np.random.default_rng(1)
    (upload,) = test_images(1, image_size)
    limits = ImageLimits(settings.max_upload_bytes, settings.max_image_pixels, settings.max_dicom_frames)
    pool, costs = [], []
    for _ in range(count):
        task, limit = mix.draw(rng)
        began = time.perf_counter()
        picture = decode_image(upload, limits).picture
        pool.append(
            runtime.prepare(Conversation.about(picture, PROMPTS[task]), GenerationOptions(limit, group=task))
        )  # type: ignore[attr-defined]
        costs.append(time.perf_counter() - began)
    return pool, float(np.median(costs)) * 1000


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_ceiling(
    runner: object, request: PreparedRequest, batches: list[int], steps: int, profile: bool
) -> dict[int, float]:
    """ms per decode step with `batch` rows of one prompt plus 64 tokens, through the engine's own step."""
    timings = {}
    with torch.inference_mode():
        for batch in batches:
            runner.prefill([(slot, request) for slot in range(batch)])  # type: ignore[attr-defined]
            for _ in range(64):
                runner.decode(batch)  # type: ignore[attr-defined]
            synchronize()
            began = time.perf_counter()
            for _ in range(steps):
                runner.decode(batch)  # type: ignore[attr-defined]
            synchronize()
            timings[batch] = (time.perf_counter() - began) / steps * 1000
            if profile and batch == batches[-1]:
                print_profile(runner, batch)
            for slot in range(batch):
                runner.release(slot)  # type: ignore[attr-defined]
    return timings


def print_profile(runner: object, batch: int) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(5):
            runner.decode(batch)  # type: ignore[attr-defined]
        synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"\ntop kernels of 5 decode steps at batch {batch}:")
    print(profiler.key_averages().table(sort_by=sort, row_limit=15))
    # What the device ran per step, and which attention kernel SDPA chose for the masked decode read.
    kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    attention = sorted(
        {
            event.name
            for event in kernels
            if any(word in event.name.lower() for word in ATTENTION_KERNEL_WORDS)
        }
    )
    print(
        f"device kernels per decode step: {len(kernels) / 5:.0f}; attention kernels: {attention or 'none seen'}"
    )


async def offline_load(engine: Engine, pool: list[PreparedRequest], clients: int, duration_s: float) -> Row:
    """Closed-loop virtual clients in this process; tokens are counted as they are generated in the window."""
    tokens = done = 0
    counting = False
    cursor = 0

    async def client() -> None:
        nonlocal tokens, done, cursor
        while True:
            request = pool[cursor % len(pool)]
            cursor += 1
            with engine.admit() as admission:
                deadline = time.monotonic() + 3600
                async with aclosing(engine.submit(admission, request, deadline_s=deadline)) as events:
                    async for event in events:
                        if counting and isinstance(event, TokenDelta):
                            tokens += len(event.token_ids)
                        if counting and isinstance(event, Completed):
                            done += 1

    loops = [asyncio.create_task(client()) for _ in range(clients)]
    await asyncio.sleep(min(10.0, duration_s / 3))  # warm-up: the batch fills
    counting = True
    began = time.monotonic()
    await asyncio.sleep(duration_s)
    elapsed = time.monotonic() - began
    counting = False
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    return Row("offline continuous", clients, tokens / elapsed, done / elapsed, window_s=elapsed)


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure_in_process(args: argparse.Namespace, mix: Mix) -> tuple[dict[int, float], float, list[Row]]:
    """The decode step ceiling, the serving path's CPU work per request, and the engine's offline rows."""
    env = settings_for(args, "continuous", COMPILE_MODES[args.compile][0])
    settings = Settings(**{key.removeprefix("MEDMO_").lower(): value for key, value in env.items()})
    runtime = build_runtime(args.shape, settings)
    with single_threaded_torch():  # as on the service's preparation threads
        pool, prepare_ms = prepared_pool(runtime, settings, mix, args.image_size, 256)
    print(
        f"decoding and preparing one {args.image_size}x{args.image_size} PNG: {prepare_ms:.1f} ms", flush=True
    )
    runner = build_runner(settings, runtime)
    began = time.monotonic()
    with torch.inference_mode():
        runner.warm_up()
    print(
        f"decode graphs: {runner.graph_note}; {runner.compile_note}; {time.monotonic() - began:.1f} s",
        flush=True,
    )
    batches = [b for b in (1, 32, 64, 128) if b <= runner.slots]
    ceiling = decode_ceiling(runner, pool[0], batches, args.ceiling_steps, args.profile)
    print(f"decode step ceiling (ms): {json.dumps({b: round(t, 2) for b, t in ceiling.items()})}", flush=True)
    engine = continuous_engine(settings, runner, runtime, Metrics())
    rows = asyncio.run(offline_rows(engine, pool, args.clients, args.offline_duration))
    del engine, runner, runtime
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ceiling, prepare_ms, rows


async def offline_rows(
    engine: Engine, pool: list[PreparedRequest], clients_list: list[int], duration_s: float
) -> list[Row]:
    await engine.start()  # the graphs captured for the ceiling are kept
    rows = []
    try:
        for clients in clients_list:
            row = await offline_load(engine, pool, clients, duration_s)
            print(f"offline {clients} clients: {row.tokens_per_s:.1f} tokens/s", flush=True)
            rows.append(row)
    finally:
        await engine.stop()
    return rows


# --- 3: served over HTTP ---


async def served_load(url: str, label: str, clients: int, duration_s: float, mix: Mix, image: bytes) -> Row:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    tokens = 0
    counting = False

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        rng = np.random.default_rng(100 + index)
        while True:
            task, limit = mix.draw(rng)
            began = time.monotonic()
            response = await http.post(
                f"{url}/{task}",
                files={"image": ("image.png", image, "image/png")},
                data={**FIELDS[task], "max_new_tokens": str(limit)},
            )
            if not counting:
                continue
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code == 200:
                latencies.append(time.monotonic() - began)
                tokens += response.json()["usage"]["completion_tokens"]
            elif response.status_code == 429:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits) as http:
        loops = [asyncio.create_task(client(n, http)) for n in range(clients)]
        await asyncio.sleep(min(10.0, duration_s / 3))  # warm-up: the batch fills, the first answers return
        before = step_counters(url)
        counting = True
        began = time.monotonic()
        await asyncio.sleep(duration_s)
        elapsed = time.monotonic() - began
        counting = False
        after = step_counters(url)
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    steps = after[1] - before[1]
    ok = sorted(latencies)
    return Row(
        label,
        clients,
        tokens / elapsed,
        len(ok) / elapsed,
        float(np.percentile(ok, 50)) if ok else float("nan"),
        float(np.percentile(ok, 99)) if ok else float("nan"),
        (after[0] - before[0]) / steps * 1000 if steps else float("nan"),
        {status: n for status, n in statuses.items() if status != 200},
        window_s=elapsed,
    )


def step_counters(url: str) -> tuple[float, float]:
    """(sum, count) of the continuous engine's decode step histogram; zeros for the generate engine."""
    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "medmo_decode_step_seconds_sum":
                total = sample.value
            elif sample.name == "medmo_decode_step_seconds_count":
                count = sample.value
    return total, count


def measure_served(
    args: argparse.Namespace, engine: str, clients_list: list[int], mix: Mix, compile_step: str = "auto"
) -> tuple[list[Row], dict[str, object]]:
    image = test_images(1, args.image_size)[0]
    rows = []
    command = [sys.executable, "-m", "bench.server", "--shape", args.shape]
    label = "served uncompiled" if engine == "continuous" and compile_step == "off" else f"served {engine}"
    with (
        tempfile.TemporaryDirectory() as scratch,
        serve(
            None,
            Path(scratch) / "server.log",
            env=settings_for(args, engine, compile_step),
            command=command,
            ready_timeout_s=1200,
        ) as server,
    ):
        info = httpx.get(f"{server.url}/info", timeout=30).json()
        print(
            f"served {engine}: {json.dumps(info['engine'])} on {info['device']} ({info['dtype']})", flush=True
        )
        duration_s = args.generate_duration if engine == "generate" else args.duration
        for clients in clients_list:
            row = asyncio.run(served_load(server.url, label, clients, duration_s, mix, image))
            print(f"{label} {clients} clients: {row.tokens_per_s:.1f} tokens/s", flush=True)
            rows.append(row)
        server.terminate(120)
    return rows, info


# --- the report ---


def print_report(rows: list[Row], ceiling: dict[int, float], prepare_ms: float, device: str) -> None:
    print(f"\n{device}; every number below was measured in this run\n")
    header = (
        f"{'run':<22}{'clients':>8}{'tokens/s':>10}{'req/s':>8}{'p50 s':>8}{'p99 s':>8}{'step ms':>9}"
        f"{'window s':>10}  failures"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        short = " *" if row.window_too_short else "  "
        print(
            f"{row.label:<22}{row.clients:>8}{row.tokens_per_s:>10.1f}{row.requests_per_s:>8.2f}"
            f"{row.p50_s:>8.2f}{row.p99_s:>8.2f}{row.decode_step_ms:>9.2f}{row.window_s:>8.1f}{short}"
            f"  {row.failures or 'none'}"
        )
    if any(row.window_too_short for row in rows):
        print("* window under 3x the p50 latency: it measures the phases of a few batches, not a rate")
    by = {(row.label, row.clients): row for row in rows}
    print("\ndecode step ceiling: " + ", ".join(f"batch {b}: {t:.2f} ms" for b, t in ceiling.items()))
    offline = [row for row in rows if row.label == "offline continuous"]
    if offline and prepare_ms > 0:
        # Whether the serving path's CPU work can keep up: the engine's fastest rate, in requests, against
        # what one preparation thread does (the service runs MEDMO_PREPARE_WORKERS of them).
        fastest = max(offline, key=lambda row: row.requests_per_s)
        needed = fastest.requests_per_s * prepare_ms / 1000
        print(
            f"serving path: {prepare_ms:.1f} ms of decoding and preparing per request on one thread; the engine's "
            f"fastest offline rate ({fastest.requests_per_s:.1f} requests/s at {fastest.clients} clients) needs "
            f"{needed:.2f} threads' worth"
        )
    for (label, clients), row in sorted(by.items(), key=lambda item: item[0][1]):
        if label != "served continuous":
            continue
        generate = by.get(("served generate", clients))
        offline = by.get(("offline continuous", clients))
        parts = [f"{clients} clients:"]
        if generate and generate.tokens_per_s:
            parts.append(f"continuous / generate {row.tokens_per_s / generate.tokens_per_s:.2f}x")
        uncompiled = by.get(("served uncompiled", clients))
        if uncompiled and uncompiled.tokens_per_s:
            parts.append(f"compiled / uncompiled {row.tokens_per_s / uncompiled.tokens_per_s:.2f}x")
        if offline and offline.tokens_per_s:
            parts.append(f"served / offline {row.tokens_per_s / offline.tokens_per_s:.2f}")
        print("  ".join(parts))
    served64 = by.get(("served continuous", 64))
    generate64 = by.get(("served generate", 64))
    offline64 = by.get(("offline continuous", 64))
    one = by.get(("served continuous", 1))
    print("\naims (H200):")
    if served64:
        print(f"  >= 3000 useful tokens/s at 64 clients: {served64.tokens_per_s:.0f}")
    if served64 and generate64 and generate64.tokens_per_s:
        print(
            f"  >= 10x the generate engine at 64 clients: {served64.tokens_per_s / generate64.tokens_per_s:.1f}x"
        )
    if one:
        print(
            f"  1-client decode step <= 12 ms: {one.decode_step_ms:.2f} ms served, {ceiling.get(1, float('nan')):.2f} ms alone"
        )
    if served64 and offline64 and offline64.tokens_per_s:
        print(
            f"  served >= 0.9 of offline at 64 clients: {served64.tokens_per_s / offline64.tokens_per_s:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 32, 64, 128])
    parser.add_argument(
        "--generate-clients",
        type=lambda s: [int(c) for c in s.split(",")] if s else [],
        default=[1, 64],
        help="client counts for the generate engine (its long batches make each window costly)",
    )
    parser.add_argument("--mix", default="vqa=16-64,ground=32-128,report=128-512")
    parser.add_argument(
        "--duration", type=float, default=40.0, help="seconds of served load per client count"
    )
    parser.add_argument(
        "--generate-duration",
        type=float,
        default=120.0,
        help="seconds of served load per client count for the generate engine, whose answers take longest",
    )
    parser.add_argument("--offline-duration", type=float, default=20.0)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--slots", type=int, default=128, help="MEDMO_MAX_SLOTS (0: fit to memory)")
    parser.add_argument("--context", type=int, default=1024, help="MEDMO_MAX_CONTEXT")
    parser.add_argument(
        "--generate-batch", type=int, default=64, help="MEDMO_MAX_BATCH_SIZE of the generate engine"
    )
    parser.add_argument("--generate-wait-ms", type=float, default=200.0)
    parser.add_argument("--ceiling-steps", type=int, default=50)
    parser.add_argument(
        "--skip", default="", help="comma-separated phases to skip: offline, continuous, generate"
    )
    parser.add_argument(
        "--compile",
        choices=sorted(COMPILE_MODES),
        default="both",
        help="the continuous engine's decode step through torch.compile (MEDMO_COMPILE): on, off, or both "
        "served one after the other (the in-process rows use the first: on)",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    mix = Mix.parse(args.mix)
    skip = set(filter(None, args.skip.split(",")))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"

    rows: list[Row] = []
    ceiling: dict[int, float] = {}
    prepare_ms = float("nan")
    if "offline" not in skip:
        ceiling, prepare_ms, offline = measure_in_process(args, mix)
        rows += offline
    if "continuous" not in skip:
        for compile_step in COMPILE_MODES[args.compile]:
            rows += measure_served(args, "continuous", args.clients, mix, compile_step)[0]
    if "generate" not in skip and args.generate_clients:
        rows += measure_served(args, "generate", args.generate_clients, mix)[0]
    print_report(rows, ceiling, prepare_ms, device)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": device,
                    "ceiling_ms": ceiling,
                    "prepare_ms": prepare_ms,
                    "rows": [asdict(r) for r in rows],
                }
            )
        )


if __name__ == "__main__":
    main()
