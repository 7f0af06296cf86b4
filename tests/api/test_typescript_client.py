"""A TypeScript client generated from the live schema with openapi-typescript, compiled with tsc --strict and
called against a real server; and Redocly's lint of the same schema.

Node, npm and the pinned packages of tests/ts come from .ci/setup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.servers import RunningServer, serve
from tests.conftest import LIVE_API_KEY, README_GROUNDING_REPLY, png_bytes

TS = Path(__file__).parent.parent / "ts"
# What is compiled and run together with the generated types (the tools stay in tests/ts).
PROJECT_FILES = (
    "package.json",
    "tsconfig.json",
    "tsconfig.mistakes.json",
    "ground.ts",
    "mistakes.ts",
    "run.mjs",
)


def node(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("node")
    assert executable, "node is not installed: run bash .ci/setup"
    return subprocess.run(
        [executable, *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        # Redocly would otherwise look for a newer version of itself (usage reports are off in redocly.yaml).
        env={**os.environ, "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"},
    )


def tsc(project: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    compiler = cwd / "node_modules" / "typescript" / "bin" / "tsc"
    return node(compiler, "--project", project, "--strict", "--pretty", "false", cwd=cwd)


@pytest.fixture(scope="module")
def grounding_server(
    reply_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server whose model boxes MedMO's README example, so that findings[0] exists."""
    log = tmp_path_factory.mktemp("grounding-server") / "server.log"
    with serve(reply_checkpoint(README_GROUNDING_REPLY), log, env={"MEDMO_API_KEYS": LIVE_API_KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def project(grounding_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/ts beside medmo.ts, the types openapi-typescript generates from the server's /openapi.json."""
    assert (TS / "node_modules").is_dir(), "tests/ts/node_modules is missing: run bash .ci/setup"
    folder = tmp_path_factory.mktemp("typescript")
    for name in PROJECT_FILES:
        shutil.copy(TS / name, folder / name)
    (folder / "node_modules").symlink_to(TS / "node_modules")
    (folder / "openapi.json").write_text(httpx.get(f"{grounding_server.url}/openapi.json").text)
    generated = node(TS / "generate.mjs", "openapi.json", "medmo.ts", cwd=folder)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    return folder


def test_a_typed_call_compiles_under_strict_without_casts_and_reads_the_first_box(
    project: Path, grounding_server: RunningServer
) -> None:
    casts = node(TS / "casts.mjs", "ground.ts", cwd=project)
    assert (casts.returncode, casts.stdout.strip()) == (0, ""), casts.stdout + casts.stderr
    compiled = tsc("tsconfig.json", project)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr

    image = png_bytes(1000, 800)
    (project / "xray.png").write_bytes(image)
    called = node("run.mjs", grounding_server.url, LIVE_API_KEY, "xray.png", "fracture", cwd=project)
    assert called.returncode == 0, called.stdout + called.stderr
    from_typescript = json.loads(called.stdout)

    # The same request without the generated client: the TypeScript call must have read the same answer.
    expected = httpx.post(
        f"{grounding_server.url}/ground",
        files={"image": ("xray.png", image, "image/png")},
        data={"target": "fracture"},
        headers={"Authorization": f"Bearer {LIVE_API_KEY}"},
        timeout=60,
    ).json()
    first = expected["findings"][0]
    assert from_typescript == {
        "label": first["label"],
        "x_min": first["box"]["x_min"],
        "box_convention": expected["box_convention"],
    }
    assert first["label"] == "Fractures"
    assert 0 < from_typescript["x_min"] < 1


def test_the_generated_types_catch_mistakes(project: Path) -> None:
    source = (project / "mistakes.ts").read_text().splitlines()
    marked = {number for number, line in enumerate(source, start=1) if "// error:" in line}
    assert len(marked) >= 5
    compiled = tsc("tsconfig.mistakes.json", project)
    reported = {int(line) for line in re.findall(r"^mistakes\.ts\((\d+),\d+\): error", compiled.stdout, re.M)}
    assert compiled.returncode != 0
    assert reported == marked, compiled.stdout


def test_the_cast_finder_finds_casts(tmp_path: Path) -> None:
    lines = ["declare const x: unknown;", "export const a = x as number;", "export const b = <string>x;"]
    lines += ["export const c = (x as { d?: number }).d!;", "export const e: any = x;", "// @ts-ignore"]
    (tmp_path / "casts.ts").write_text("\n".join(lines) + "\n")
    found = node(TS / "casts.mjs", "casts.ts", cwd=tmp_path)
    assert found.returncode == 1
    assert found.stdout.splitlines() == [
        "casts.ts:2: cast",
        "casts.ts:3: cast",
        "casts.ts:4: non-null assertion",
        "casts.ts:4: cast",
        "casts.ts:5: any",
        "casts.ts:6: @ts-ignore",
    ]


def test_redocly_lint_finds_no_problem_in_the_live_schema(project: Path) -> None:
    linted = node(
        TS / "node_modules" / "@redocly" / "cli" / "bin" / "cli.js",
        "lint",
        "--config",
        TS / "redocly.yaml",
        "--format",
        "json",
        "openapi.json",
        cwd=project,
    )
    report = json.loads(linted.stdout)
    assert report["problems"] == [], json.dumps(report["problems"], indent=2)
    assert linted.returncode == 0, linted.stderr
