"""From prepared requests to generated tokens, behind one boundary (`protocol.Engine`).

- `runtime.py`: transformers loads MedMO and its processor; requests are prepared; `generate()` is the
  reference path.
- `gate.py`: admission and lifecycle, shared by the engines.
- `generate.py` (+ `batcher.py`): whole batches through `generate()`.
- `continuous.py` (+ `slots.py`): continuous batching over a slot KV cache, graph-captured decode.
- `sampling.py`, `grammar.py`, `scoring.py`: how tokens are chosen (sampling, constraints) and answers scored.
- `build.py`: the engine the settings name.

The package imports nothing itself, so that a leaf module here (a grammar, a request type) can be imported
without loading the engines.
"""
