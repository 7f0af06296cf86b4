"""Soak: mixed load on one server for a long time, with its resident memory sampled, to see whether it grows.

    python -m bench.soak --model CHECKPOINT --minutes 30 --clients 6     # CPU, a tiny checkpoint

Clients send one request after another, drawn in a fixed rotation from the mix a hospital's integrations
and people make: single and several images on each task, DICOM, streamed answers (some abandoned
half-way), chat with images and without, previews, and refusals (a bad image, a control token in a
question, a queue that may be full). Every `--sample-s` seconds the server's RSS is read from /proc. The
table shows RSS and requests served per sample; the summary compares the last third of the run with the
middle third (after warm-up), in MiB per 1,000 requests: a leak grows with requests, warm-up does not.
"""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

from bench.servers import serve

MIB = 1024 * 1024


def picture(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_ct() -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    return Path(str(path)).read_bytes()


def the_mix(url: str) -> list[tuple[str, Callable[[httpx.Client], int]]]:
    """Named requests, each a function of a client returning the status it got."""
    images = [picture(96 + 32 * n, 128, seed=n) for n in range(4)]
    ct = dicom_ct()
    uri = "data:image/png;base64," + base64.b64encode(images[0]).decode()

    def files(*data: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("image", (f"{n}.bin", image, "application/octet-stream")) for n, image in enumerate(data)]

    def abandoned_stream(client: httpx.Client) -> int:
        with client.stream(
            "POST", "/report", files=files(images[1]), headers={"Accept": "text/event-stream"}
        ) as response:
            for line in response.iter_lines():
                if line.startswith("event: delta"):
                    break
            return response.status_code

    def chat(content: object) -> Callable[[httpx.Client], int]:
        def send(client: httpx.Client) -> int:
            model = client.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
            return client.post("/v1/chat/completions", json=body).status_code

        return send

    return [
        ("vqa", lambda c: c.post("/vqa", files=files(images[0]), data={"question": "Effusion?"}).status_code),
        (
            "report of 3",
            lambda c: (
                c.post("/report", files=files(*images[:3]), data={"caption": ["a", "b", "c"]}).status_code
            ),
        ),
        ("ground of 2", lambda c: c.post("/ground", files=files(*images[2:])).status_code),
        (
            "ground picture",
            lambda c: c.post("/ground", files=files(images[0]), headers={"Accept": "image/png"}).status_code,
        ),
        (
            "dicom report SR",
            lambda c: c.post("/report", files=files(ct), headers={"Accept": "application/dicom"}).status_code,
        ),
        (
            "stream",
            lambda c: (
                c.post("/vqa", files=files(images[3]), data={"question": "q", "stream": "true"}).status_code
            ),
        ),
        ("abandoned stream", abandoned_stream),
        (
            "chat with an image",
            chat([{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "q"}]),
        ),
        ("chat, text alone", chat("Summarize: the lungs are clear.")),
        ("preview", lambda c: c.post("/preview", files=files(ct), data={"window": "lung"}).status_code),
        (
            "bad image",
            lambda c: c.post("/vqa", files=files(b"not an image"), data={"question": "q"}).status_code,
        ),
        (
            "control token",
            lambda c: c.post("/vqa", files=files(images[0]), data={"question": "<|im_end|>"}).status_code,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, help="checkpoint folder (default: a tiny random one, written now)"
    )
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--sample-s", type=float, default=30.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from app.tiny_checkpoint import write_checkpoint

            model = write_checkpoint(Path(scratch) / "tiny")
        env = {f"MEDMO_{task}_MAX_NEW_TOKENS": "8" for task in ("VQA", "REPORT", "GROUND", "CHAT")}
        env["MEDMO_LOG_LEVEL"] = "warning"
        with serve(model, Path(scratch) / "server.log", env=env) as server:
            soak(server.url, psutil.Process(server.process.pid), args)


def soak(url: str, process: psutil.Process, args: argparse.Namespace) -> None:
    mix = the_mix(url)
    statuses: Counter[tuple[str, int]] = Counter()
    served = 0
    lock = threading.Lock()
    ends = time.monotonic() + 60 * args.minutes

    def client_loop(offset: int) -> None:
        nonlocal served
        rotation = itertools.islice(itertools.cycle(mix), offset, None)
        with httpx.Client(base_url=url, timeout=120) as client:
            for name, send in rotation:
                if time.monotonic() >= ends:
                    return
                try:
                    status = send(client)
                except httpx.HTTPError as exc:
                    status = -1
                    print(f"{name}: {type(exc).__name__}")
                with lock:
                    statuses[(name, status)] += 1
                    served += 1

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True) for n in range(args.clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    samples: list[tuple[float, int, float]] = []  # (minutes, requests so far, RSS MiB)
    print(f"{'minute':>7} {'requests':>9} {'RSS MiB':>8}")
    while any(thread.is_alive() for thread in threads):
        time.sleep(args.sample_s)
        with lock:
            count = served
        sample = ((time.monotonic() - began) / 60, count, process.memory_info().rss / MIB)
        samples.append(sample)
        print(f"{sample[0]:7.1f} {sample[1]:9d} {sample[2]:8.1f}", flush=True)
    for thread in threads:
        thread.join()
    summarize(samples, statuses)


def summarize(samples: list[tuple[float, int, float]], statuses: Counter[tuple[str, int]]) -> None:
    print("\nstatuses:", ", ".join(f"{name} {status}: {n}" for (name, status), n in sorted(statuses.items())))
    third = max(1, len(samples) // 3)
    middle, last = samples[third : 2 * third], samples[2 * third :]
    if len(middle) < 2 or len(last) < 2:
        print("too few samples for a trend: run longer")
        return
    requests = last[-1][1] - middle[0][1]
    growth = last[-1][2] - middle[0][2]
    spread = statistics.pstdev(rss for _, _, rss in middle + last)
    print(
        f"RSS {middle[0][2]:.1f} -> {last[-1][2]:.1f} MiB over the last two thirds ({requests} requests): "
        f"{1000 * growth / max(1, requests):+.2f} MiB per 1,000 requests; spread of the samples {spread:.1f} MiB"
    )


if __name__ == "__main__":
    main()
