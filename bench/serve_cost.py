"""What one request costs: time to start serving, then latency per endpoint, one request at a time.

    python -m bench.serve_cost --model CHECKPOINT [--requests 20] [--image-size 512]

Starts medmo-serve on the checkpoint, times process start to /readyz answering 200, then sends each
endpoint the same PNG --requests times in a row (after one warm-up) and prints the median and the 90th
percentile of the client-side latency, next to the server's own inference time for the same requests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.load import FIELDS, test_images
from bench.servers import serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args()
    (image,) = test_images(1, args.image_size)

    with tempfile.TemporaryDirectory() as scratch:
        began = time.monotonic()
        with serve(args.model, Path(scratch) / "server.log", env={"MEDMO_LOG_LEVEL": "warning"}) as server:
            startup_s = time.monotonic() - began
            info = httpx.get(f"{server.url}/info").json()
            print(
                f"{info['model']} on {info['device']} ({info['dtype']}), {args.image_size}x{args.image_size} PNG"
            )
            print(f"startup (process start to /readyz 200): {startup_s:.2f} s\n")
            print(f"{'endpoint':<10}{'p50 ms':>10}{'p90 ms':>10}{'inference p50 ms':>18}{'new tokens':>12}")
            with httpx.Client(timeout=300) as client:
                for task, fields in FIELDS.items():
                    latencies, inference, tokens = [], [], []
                    for n in range(args.requests + 1):
                        sent = time.monotonic()
                        response = client.post(
                            f"{server.url}/{task}",
                            files={"image": ("a.png", image, "image/png")},
                            data=fields,
                        )
                        response.raise_for_status()
                        if n == 0:
                            continue  # warm-up
                        latencies.append((time.monotonic() - sent) * 1000)
                        body = response.json()
                        inference.append(body["timing"]["inference_ms"])
                        tokens.append(body["usage"]["completion_tokens"])
                    print(
                        f"/{task:<9}{statistics.median(latencies):>10.1f}{np.percentile(latencies, 90):>10.1f}"
                        f"{statistics.median(inference):>18.1f}{statistics.median(tokens):>12.0f}"
                    )
            server.terminate()


if __name__ == "__main__":
    main()
