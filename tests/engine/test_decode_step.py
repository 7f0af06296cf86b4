"""The decode step as a GPU runs it, checked on the CPU: compiled whole (no graph break) and equal to eager
token for token; its operations held to a budget; and captured graphs trusted only once they replay it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.conversation import Conversation
from app.engine.request import GenerationOptions
from app.engine.runtime import ModelRuntime
from app.engine.slots import CaptureError, SlotRunner
from app.settings import Settings
from app.tiny_checkpoint import build_config, build_model, build_tokenizer
from tests.conftest import rgb_image
from tests.engine.test_continuous import OpLog

# Operations one decode step dispatches on the CPU in float32: a fixed part (embedding, rope, the last norm,
# the head, argmax) and a part per layer. A change that adds work to every layer is seen here; raise these
# only with the reason. The fixed part is 57 with transformers 5.19 and later, 63 before (its rotary
# embedding takes six more), which the GPU hosts may still have.
FIXED_OPS = 63
OPS_PER_LAYER = 77


@pytest.fixture(scope="module")
def runtime(random_checkpoint: Path) -> ModelRuntime:
    return ModelRuntime.load(Settings(model=str(random_checkpoint)))


def started(runtime: ModelRuntime, runner: SlotRunner, rows: int) -> None:
    """`rows` requests of different images and prompts, prefilled into slots 0..rows-1: a little under 256
    tokens each, so that decoding crosses from the 256 span bucket to the 512 one."""
    requests = [
        runtime.prepare(
            Conversation.about(rgb_image(512 + 64 * n, 384, seed=n), f"Question {n}?"), GenerationOptions(60)
        )
        for n in range(rows)
    ]
    runner.prefill(list(enumerate(requests)))


def test_the_compiled_step_is_one_graph_and_equals_eager_token_for_token(runtime: ModelRuntime) -> None:
    eager = SlotRunner(runtime.model, slots=2, context=512, graphs=False)
    compiled = SlotRunner(runtime.model, slots=2, context=512, graphs=False, compiled=True)
    with torch.inference_mode():
        compiled.warm_up()  # fullgraph=True: a graph break would raise here
        assert compiled.compile_note.startswith("compiled, 4 buckets")
        tokens: dict[str, list[list[int]]] = {"eager": [], "compiled": []}
        for name, runner in (("eager", eager), ("compiled", compiled)):
            started(runtime, runner, 2)
            for step in range(50):
                # One row, then both: the steps cross batch buckets 1 and 2, and span buckets 256 and 512
                # as the prompts grow past 256 tokens.
                tokens[name].append(runner.decode(1 if step % 3 == 0 else 2))
    assert max(eager.lengths) > 256
    assert tokens["compiled"] == tokens["eager"]


def ops_of_one_step(layers: int) -> int:
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    config.text_config.num_hidden_layers = layers
    runner = SlotRunner(build_model(config), slots=4, context=512, graphs=False)
    with torch.inference_mode():
        log = OpLog()
        with log:
            runner._step(4, 256)
    return len(log.ops)


def test_one_step_dispatches_no_more_operations_than_its_budget() -> None:
    one, two = ops_of_one_step(1), ops_of_one_step(2)
    per_layer, fixed = two - one, 2 * one - two
    assert per_layer <= OPS_PER_LAYER, f"{per_layer} operations per layer"
    assert fixed <= FIXED_OPS, f"{fixed} operations besides the layers"


class Graph:
    """A stand-in for a captured graph: `replay` does what it is given."""

    def __init__(self, replay: Any) -> None:
        self.replay = replay


def test_a_graph_that_does_not_replay_the_step_is_refused(runtime: ModelRuntime) -> None:
    runner = SlotRunner(runtime.model, slots=4, context=512, graphs=False)
    with torch.inference_mode():
        runner._graphs = {(2, 256): Graph(lambda: runner._step(2, 256))}
        runner.verify_graphs()  # the step itself passes
        runner._graphs = {(2, 256): Graph(lambda: None)}  # what an empty capture replays: nothing
        with pytest.raises(CaptureError, match=r"batch 2, span 256\).*changes nothing"):
            runner.verify_graphs()
        runner._graphs = {(4, 256): Graph(lambda: runner._step(2, 256))}  # a smaller bucket's step
        with pytest.raises(CaptureError, match=r"batch 4, span 256\) does not replay"):
            runner.verify_graphs()


def failing_capture() -> None:
    raise RuntimeError("operation not permitted when stream is capturing")


def test_a_capture_that_fails_stops_the_start_unless_eager_is_allowed(runtime: ModelRuntime) -> None:
    for allow_eager in (False, True):
        runner = SlotRunner(runtime.model, slots=2, context=512, graphs=False, allow_eager=allow_eager)
        runner._want_graphs = True  # as on a GPU
        runner._capture = failing_capture  # type: ignore[method-assign]
        if allow_eager:
            runner.warm_up()
            assert runner.graph_note.startswith(
                "eager: capture failed (RuntimeError: operation not permitted"
            )
            assert runner.graphs_replaying == 0
        else:
            with pytest.raises(CaptureError, match="MEDMO_ALLOW_EAGER=true"):
                runner.warm_up()
