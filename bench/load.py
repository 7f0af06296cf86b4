"""Load generator: concurrent clients against the generate engine, batched and unbatched in one invocation.

    python -m bench.load --model CHECKPOINT --clients 16 --duration 20     # CPU, a tiny checkpoint
    python -m bench.load --shape 8b --clients 32 --duration 30              # GPU, MedMO-8B's shape
    python -m bench.load --url http://127.0.0.1:8000 --clients 16           # one run, a running server

For each batch size in --batch-sizes it starts a server (MEDMO_ENGINE=generate) with MEDMO_MAX_BATCH_SIZE set to it, offers the
same load (clients each sending one request after another, a mix of tasks, for --duration seconds), and
reads the server's own metrics for the mean batch size. It prints one table and the throughput ratio of
the first batch size to the last, both measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import serve

FIELDS: dict[str, dict[str, str]] = {
    "vqa": {"question": "Is there a pleural effusion?"},
    "report": {"modality": "chest X-ray", "indication": "shortness of breath"},
    "ground": {},
}


@dataclass
class Outcome:
    task: str
    status: int
    latency_s: float
    completion_tokens: int


@dataclass
class Run:
    label: str
    clients: int
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)
    mean_batch_size: float = float("nan")

    @property
    def succeeded(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def requests_per_s(self) -> float:
        return len(self.succeeded) / self.duration_s

    @property
    def tokens_per_s(self) -> float:
        return sum(o.completion_tokens for o in self.succeeded) / self.duration_s

    def latency_percentile(self, percent: int) -> float:
        latencies = sorted(o.latency_s for o in self.succeeded)
        if not latencies:
            return float("nan")
        return float(np.percentile(latencies, percent))

    @property
    def failures(self) -> dict[int, int]:
        return dict(Counter(o.status for o in self.outcomes if o.status != 200))


def test_images(count: int, side: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


async def client_loop(
    client: httpx.AsyncClient, url: str, index: int, tasks: list[str], images: list[bytes], run: Run
) -> None:
    sent = index
    while True:
        task = tasks[sent % len(tasks)]
        image = images[sent % len(images)]
        sent += 1
        began = time.monotonic()
        response = await client.post(
            f"{url}/{task}", files={"image": ("image.png", image, "image/png")}, data=FIELDS[task]
        )
        tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        run.outcomes.append(Outcome(task, response.status_code, time.monotonic() - began, tokens))
        if response.status_code == 429:
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))


def batch_counters(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "medmo_batch_size":
            for sample in family.samples:
                if sample.name == "medmo_batch_size_sum":
                    total = sample.value
                elif sample.name == "medmo_batch_size_count":
                    count = sample.value
    return total, count


async def offer_load(
    url: str, label: str, clients: int, duration_s: float, tasks: list[str], images: list[bytes]
) -> Run:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        for task in tasks:  # warm-up, not counted: first calls pay for lazy initialisation
            warm = await client.post(
                f"{url}/{task}", files={"image": ("w.png", images[0], "image/png")}, data=FIELDS[task]
            )
            warm.raise_for_status()
        before = batch_counters(url)
        run = Run(label=label, clients=clients, duration_s=duration_s)
        loops = [asyncio.create_task(client_loop(client, url, n, tasks, images, run)) for n in range(clients)]
        # Requests still in flight when the time is up are abandoned: only completions inside the window count.
        await asyncio.wait(loops, timeout=duration_s)
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
    after = batch_counters(url)
    batches = after[1] - before[1]
    run.mean_batch_size = (after[0] - before[0]) / batches if batches else float("nan")
    return run


def print_table(runs: list[Run]) -> None:
    header = f"{'run':<24}{'clients':>8}{'ok':>7}{'req/s':>9}{'tok/s':>10}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}{'batch':>7}  failures"
    print(header)
    print("-" * len(header))
    for run in runs:
        print(
            f"{run.label:<24}{run.clients:>8}{len(run.succeeded):>7}{run.requests_per_s:>9.2f}{run.tokens_per_s:>10.1f}"
            f"{run.latency_percentile(50):>8.2f}{run.latency_percentile(95):>8.2f}{run.latency_percentile(99):>8.2f}"
            f"{run.mean_batch_size:>7.1f}  {run.failures or 'none'}"
        )
    if len(runs) > 1:
        first, last = runs[0], runs[-1]
        print(
            f"\nthroughput ratio {first.label} / {last.label}: "
            f"{first.requests_per_s / last.requests_per_s:.2f}x requests/s, "
            f"{first.tokens_per_s / last.tokens_per_s:.2f}x tokens/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="checkpoint folder to serve with medmo-serve")
    target.add_argument(
        "--shape", help="serve random weights of this shape built on the device (bench.server)"
    )
    target.add_argument("--url", help="a server already running: one run, no comparison")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run")
    parser.add_argument("--batch-sizes", default="16,1", help="MEDMO_MAX_BATCH_SIZE per run (default 16,1)")
    parser.add_argument("--tasks", default="vqa,report,ground")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per task, for every run")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    tasks = args.tasks.split(",")
    images = test_images(8, args.image_size)
    runs: list[Run] = []
    if args.url:
        runs.append(asyncio.run(offer_load(args.url, "server", args.clients, args.duration, tasks, images)))
    else:
        command = [sys.executable, "-m", "bench.server", "--shape", args.shape] if args.shape else None
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            env = {
                "MEDMO_ENGINE": "generate",
                "MEDMO_MAX_BATCH_SIZE": str(batch_size),
                "MEDMO_MAX_WAIT_MS": str(args.max_wait_ms),
                "MEDMO_MAX_QUEUE": str(max(256, 4 * args.clients)),
                "MEDMO_LOG_LEVEL": "warning",
                **{f"MEDMO_{task.upper()}_MAX_NEW_TOKENS": str(args.max_new_tokens) for task in FIELDS},
            }
            with (
                tempfile.TemporaryDirectory() as scratch,
                serve(
                    args.model, Path(scratch) / "server.log", env=env, command=command, ready_timeout_s=900
                ) as server,
            ):
                info = httpx.get(f"{server.url}/info").json()
                print(
                    f"serving {info['model']} on {info['device']} ({info['dtype']}), max batch {batch_size}",
                    flush=True,
                )
                runs.append(
                    asyncio.run(
                        offer_load(
                            server.url,
                            f"max_batch_size={batch_size}",
                            args.clients,
                            args.duration,
                            tasks,
                            images,
                        )
                    )
                )
                server.terminate()
    print()
    print_table(runs)
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    asdict(run) | {"requests_per_s": run.requests_per_s, "tokens_per_s": run.tokens_per_s}
                    for run in runs
                ]
            )
        )


if __name__ == "__main__":
    main()
