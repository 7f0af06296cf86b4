"""What a decode step costs when its rows sample, or are constrained, against plain greedy rows.

    python -m bench.decoding --rows 64                  # the tiny model, here on the CPU
    python -m bench.decoding --rows 64 --shape 8b       # MedMO-8B's shape (random weights), on a GPU

The engine's own runner (`app.engine.slots.SlotRunner`, graphs and compile as the service sets them on the
device) runs `--rows` rows of one prompt, four ways:

- **greedy**: the plain step, the argmax inside the step's own graph;
- **sampled**: temperature 0.8, top-p 0.95, top-k 50, a seed per row: the step, then the token choice
  with rules (a second graph on a GPU);
- **constrained**: greedy under a JSON schema: the host fills each row's mask from its grammar before the
  step (llguidance), and the step waits for the previous one's tokens, which its grammar must take first;
- **mixed**: one constrained row among greedy ones: what a free row pays for sharing a step.

Each prints ms per step (the best of three rounds), and its ratio to greedy, measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from app.conversation import Conversation
from app.engine.grammar import Constraint, GrammarMatcher
from app.engine.request import GenerationOptions, PreparedRequest, Sampling
from app.engine.runtime import ModelRuntime
from app.engine.slots import SlotRunner
from app.settings import Settings
from bench.server import build_runtime

SCHEMA = {
    "type": "object",
    "properties": {
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 40},
                    "side": {"enum": ["left", "right", "bilateral"]},
                    "size_mm": {"type": "integer", "minimum": 0, "maximum": 300},
                },
                "required": ["label", "side"],
            },
        },
        "urgent": {"type": "boolean"},
    },
    "required": ["findings", "urgent"],
}


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Rows:
    """`rows` running requests of one prompt in a runner, decoded step after step as the engine does."""

    def __init__(
        self, runner: SlotRunner, runtime: ModelRuntime, prompt: PreparedRequest, kinds: list[str]
    ) -> None:
        self.runner = runner
        self.runtime = runtime
        self.kinds = kinds
        sampled = Sampling(temperature=0.8, top_p=0.95, top_k=50)
        requests = []
        for row, kind in enumerate(kinds):
            options = GenerationOptions(1 << 20)
            if kind == "sampled":
                options = replace(options, sampling=replace(sampled, seed=row))
            request = replace(prompt, options=options)
            if kind == "constrained":
                request = runtime.constrained(request, Constraint.json_schema(SCHEMA))
            requests.append(request)
        self.requests = requests
        self.matchers: dict[int, GrammarMatcher] = {}
        for row, request in enumerate(requests):
            if request.options.constraint is not None:
                self.matchers[row] = request.options.constraint.matcher()  # type: ignore[assignment]
        first = runner.prefill(list(enumerate(requests)), sorted(self.matchers.items()))
        self._took(first.tokens)

    def _took(self, tokens: list[int]) -> None:
        for row, matcher in self.matchers.items():
            if tokens[row] in self.runtime.eos_token_ids:  # an answer complete: the row starts another
                self.matchers[row] = self.requests[row].options.constraint.matcher()  # type: ignore[union-attr,assignment]
            else:
                matcher.accept(tokens[row])

    def step(self) -> None:
        chosen = self.runner.decode(len(self.kinds), sorted(self.matchers.items()))
        self._took(chosen.tokens)

    def release(self) -> None:
        for row in range(len(self.kinds)):
            self.runner.release(row)


def ms_per_step(rows: Rows, steps: int) -> float:
    for _ in range(8):
        rows.step()
    synchronize()
    samples = []
    for _ in range(3):
        began = time.perf_counter()
        for _ in range(steps):
            rows.step()
        synchronize()
        samples.append((time.perf_counter() - began) / steps * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shape", choices=["tiny", "8b"], default="tiny")
    args = parser.parse_args()
    runtime = build_runtime(args.shape, Settings(model=f"random-weights:{args.shape}"))
    model: Any = runtime.model
    gpu = model.device.type == "cuda"
    runner = SlotRunner(model, slots=args.rows, context=1024, graphs=gpu, compiled=gpu)
    with torch.inference_mode():
        runner.warm_up()
        picture = Image.new("RGB", (256, 256), (90, 90, 90))
        prompt = runtime.prepare(Conversation.about(picture, "Describe the findings."), GenerationOptions(1))
        print(
            f"{args.rows} rows, {args.shape} shape on {model.device} ({runner.describe()['decode_graphs']}); "
            f"ms per decode step, the best of 3 rounds of 3 x {args.steps} steps, measured in this run\n"
        )
        print(f"{'rows':<34}{'ms/step':>10}{'/ greedy':>10}")
        layouts = {
            "greedy": ["greedy"] * args.rows,
            "sampled": ["sampled"] * args.rows,
            "constrained (JSON schema)": ["constrained"] * args.rows,
            "mixed: 1 constrained, rest greedy": ["constrained"] + ["greedy"] * (args.rows - 1),
        }
        # Every layout measured in three rounds, the best kept: the first round also pays one-time costs
        # (the CPU's kernels for new shapes), and a busy host slows any one of them.
        best = dict.fromkeys(layouts, float("inf"))
        for _ in range(3):
            for name, kinds in layouts.items():
                rows = Rows(runner, runtime, prompt, kinds)
                best[name] = min(best[name], ms_per_step(rows, args.steps))
                rows.release()
        for name, took in best.items():
            print(f"{name:<34}{took:>10.3f}{took / best['greedy']:>10.2f}")


if __name__ == "__main__":
    main()
