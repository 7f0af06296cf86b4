"""Plain transformers generate() on the same random-weight model, no server: the ceiling to compare with.

Builds the model as bench.server does, prepares requests with the service's own runtime (so prompts and
images are the same), and times one generate() per batch size with the length forced, as the GPU anchors
were measured. Serving throughput divided by this, on the same machine in the same session, is the cost of
HTTP, decoding, queueing and batching.

    python -m bench.generate_baseline --shape 8b --batch-sizes 1,32 --max-new-tokens 128 --image-size 512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.conversation import Conversation
from app.engine.request import GenerationOptions
from app.engine.runtime import collate
from app.settings import Settings
from app.tasks.ground import GroundFields, ground_prompt
from app.tasks.report import ReportFields, report_prompt
from app.tiny_checkpoint import SHAPES
from bench.server import build_runtime

PROMPTS = [
    "Is there a pleural effusion?",
    report_prompt(ReportFields(modality="chest X-ray", indication="shortness of breath")),
    ground_prompt(GroundFields(), "pixel"),
]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument(
        "--mixed-prompts",
        action="store_true",
        help="use the three tasks' prompts in turn, so the batch needs padding as served batches do",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    runtime = build_runtime(args.shape, Settings(model=f"random-weights:{args.shape}"))
    model = runtime.model
    rng = np.random.default_rng(0)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens)
    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        prepared = [
            runtime.prepare(
                Conversation.about(
                    Image.fromarray(
                        rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
                    ),
                    PROMPTS[n % len(PROMPTS)] if args.mixed_prompts else PROMPTS[0],
                ),
                options,
            )
            for n in range(batch_size)
        ]
        inputs = {
            k: v.to(model.device)
            for k, v in collate([p.features for p in prepared], runtime.pad_token_id).items()
        }
        forced = {"do_sample": False, "eos_token_id": None, "pad_token_id": runtime.pad_token_id}
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **forced)  # warm-up
            synchronize()
            began = time.perf_counter()
            model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, **forced
            )
            synchronize()
            elapsed = time.perf_counter() - began
        result = {
            "batch": batch_size,
            "prompt_tokens": sorted({p.prompt_tokens for p in prepared}),
            "new_tokens": args.max_new_tokens,
            "wall_s": round(elapsed, 3),
            "tokens_per_s": round(batch_size * args.max_new_tokens / elapsed, 1),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
