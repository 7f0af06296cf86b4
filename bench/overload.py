"""Overload: offer several times what the server can serve and check it degrades the way it promises.

    python -m bench.overload --model CHECKPOINT [--factor 4] [--duration 60] [--deadline 5]

1. Measures capacity: closed-loop clients for a few seconds (requests/s served).
2. Warms up: the overload below for a few seconds, then reads the server's resident memory.
3. Offers `factor` x capacity, open loop (arrivals at a fixed rate, whatever happens to earlier requests),
   each request with X-Request-Timeout = deadline, for `duration` seconds; reads the memory again.
4. Sends SIGTERM while the load is still arriving, and keeps offering it for a few seconds (drain).

Images are small (64x64, scaled up by the processor like any other) and generations long, so that the
client, which shares the machine, can really offer four times what the server serves.

It prints the outcome counts and latencies and checks the promises: every request ends with 200, 429
or 504 within its deadline plus one second; nothing but 503 while draining; no request left hanging
(a client-side timeout); resident memory at the end within 10% of its level after warm-up. Exit status
1 if a promise is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.load import FIELDS, Run, offer_load, test_images
from bench.servers import serve

TASKS = list(FIELDS)
DRAIN_S = 3.0
WARM_UP_S = 10.0


@dataclass
class Outcome:
    sent_at: float
    status: int | None  # None: the client gave up waiting (a hanging request) or the connection failed
    latency_s: float
    phase: str  # "load" or "drain"
    error: str = ""


async def offer_open_loop(
    url: str,
    rate: float,
    duration_s: float,
    deadline_s: float,
    images: list[bytes],
    phase: str,
    outcomes: list[Outcome],
) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    # The client waits well past the deadline: a request that outlives it is a hanging request.
    async with httpx.AsyncClient(timeout=httpx.Timeout(deadline_s + 10), limits=limits) as client:

        async def one(number: int) -> None:
            task = TASKS[number % len(TASKS)]
            # Timed from when this request really goes out: the client shares the machine, and its own
            # scheduling delays are not the server's.
            sent_at = time.monotonic()
            try:
                response = await client.post(
                    f"{url}/{task}",
                    files={"image": ("image.png", images[number % len(images)], "image/png")},
                    data=FIELDS[task],
                    headers={"X-Request-Timeout": str(deadline_s)},
                )
                outcomes.append(Outcome(sent_at, response.status_code, time.monotonic() - sent_at, phase))
            except httpx.HTTPError as exc:
                outcomes.append(Outcome(sent_at, None, time.monotonic() - sent_at, phase, type(exc).__name__))

        began = time.monotonic()
        pending = []
        number = 0
        while time.monotonic() - began < duration_s:
            pending.append(asyncio.create_task(one(number)))
            number += 1
            await asyncio.sleep(max(0.0, began + number / rate - time.monotonic()))
        await asyncio.gather(*pending)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--factor", type=float, default=4.0, help="offered load as a multiple of capacity")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--deadline", type=float, default=5.0, help="X-Request-Timeout of every request")
    # Long enough generations that capacity is a rate the client, on the same machine, can quadruple.
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    args = parser.parse_args()

    images = test_images(8, 64)
    env = {
        "MEDMO_MAX_QUEUE": str(args.max_queue),
        "MEDMO_MAX_IMAGES": str(min(8, args.max_queue)),  # each image of a grounding takes a place
        "MEDMO_MAX_BATCH_SIZE": str(args.max_batch_size),
        "MEDMO_LOG_LEVEL": "warning",
        "MEDMO_SHUTDOWN_GRACE_S": "30",
        **{f"MEDMO_{task.upper()}_MAX_NEW_TOKENS": str(args.max_new_tokens) for task in FIELDS},
    }
    broken: list[str] = []
    with (
        tempfile.TemporaryDirectory() as scratch,
        serve(args.model, Path(scratch) / "server.log", env=env) as server,
    ):
        process = psutil.Process(server.process.pid)
        capacity_run: Run = asyncio.run(offer_load(server.url, "capacity", 8, 10.0, TASKS, images))
        capacity = capacity_run.requests_per_s
        rate = args.factor * capacity
        asyncio.run(offer_open_loop(server.url, rate, WARM_UP_S, args.deadline, images, "warm-up", []))
        time.sleep(2)
        rss_warm = process.memory_info().rss
        print(
            f"capacity {capacity:.1f} requests/s; offering {rate:.1f} requests/s ({args.factor:g}x) "
            f"for {args.duration:g} s, deadline {args.deadline:g} s",
            flush=True,
        )

        outcomes: list[Outcome] = []
        asyncio.run(offer_open_loop(server.url, rate, args.duration, args.deadline, images, "load", outcomes))
        time.sleep(2)  # let the last batches finish and memory settle before reading it
        rss_end = process.memory_info().rss

        async def drain_under_load() -> None:
            offering = asyncio.create_task(
                offer_open_loop(server.url, rate, DRAIN_S, args.deadline, images, "drain", outcomes)
            )
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            await offering

        asyncio.run(drain_under_load())
        exit_code = server.process.wait(60)

    load = [o for o in outcomes if o.phase == "load"]
    offered = len(load) / args.duration
    drain = [o for o in outcomes if o.phase == "drain"]
    by_status = Counter(o.status for o in load)
    print(f"\n{'phase':<7}{'sent':>7}  outcomes")
    print(f"{'load':<7}{len(load):>7}  {dict(sorted(by_status.items(), key=lambda kv: str(kv[0])))}")
    drained = Counter(o.status if o.status is not None else f"refused ({o.error})" for o in drain)
    print(f"{'drain':<7}{len(drain):>7}  {dict(drained)}")
    print(f"\n{'status':<8}{'p50 s':>8}{'p99 s':>8}{'max s':>8}")
    for status in sorted(by_status, key=str):
        latencies = [o.latency_s for o in load if o.status == status]
        print(
            f"{status!s:<8}{percentile(latencies, 50):>8.3f}{percentile(latencies, 99):>8.3f}{max(latencies):>8.3f}"
        )
    print(f"\noffered {offered:.1f} requests/s in fact ({offered / capacity:.2f}x capacity)")
    served = by_status.get(200, 0) / args.duration
    print(f"served {served:.1f} requests/s under overload ({served / capacity:.2f}x capacity)")
    print(
        f"resident memory: {rss_warm / 2**20:.0f} MiB after warm-up, {rss_end / 2**20:.0f} MiB at the end "
        f"({(rss_end / rss_warm - 1) * 100:+.1f}%)"
    )
    print(f"server exit status after SIGTERM: {exit_code}")

    if set(by_status) - {200, 429, 504}:
        broken.append(f"load outcomes other than 200/429/504: {dict(by_status)}")
    late = [o for o in load if o.latency_s > args.deadline + 1]
    if late:
        broken.append(
            f"{len(late)} requests ended after their deadline + 1 s (max {max(o.latency_s for o in late):.2f} s)"
        )
    # After SIGTERM the server stops listening once drained, so refused connections are expected then.
    hanging = [o for o in outcomes if o.status is None and (o.phase == "load" or "Timeout" in o.error)]
    if hanging:
        broken.append(
            f"{len(hanging)} requests hung or failed at the connection: {Counter(o.error for o in hanging)}"
        )
    server_errors = [o for o in drain if o.status is not None and o.status >= 500 and o.status != 503]
    if server_errors:
        broken.append(f"5xx other than 503 while draining: {Counter(o.status for o in server_errors)}")
    if abs(rss_end / rss_warm - 1) > 0.10:
        broken.append("resident memory moved by more than 10%")
    if exit_code != 0:
        broken.append(f"the server exited with {exit_code} after SIGTERM")
    print("\n" + ("promises kept" if not broken else "BROKEN:\n  " + "\n  ".join(broken)))
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
