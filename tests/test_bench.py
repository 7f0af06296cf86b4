"""The benchmarks are run by hand (a GPU host, a long soak), not by CI: CI keeps them importable, so that a
change in the service's modules does not break them unseen."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHES = sorted(
    path.stem for path in (Path(__file__).parent.parent / "bench").glob("*.py") if path.stem != "__init__"
)


@pytest.mark.parametrize("module", BENCHES)
def test_every_benchmark_imports(module: str) -> None:
    importlib.import_module(f"bench.{module}")
