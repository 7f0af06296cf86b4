"""The README is part of the product: its configuration table and commands must stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings
from bench.servers import RunningServer
from tests.conftest import LIVE_API_KEY
from tests.pacs.studies import cr_study

README = (Path(__file__).parent.parent / "README.md").read_text()
CI_RUN = (Path(__file__).parent.parent / ".ci" / "run").read_text()


def test_every_setting_is_in_the_configuration_table_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `(MEDMO_[A-Z0-9_]+)` \| ([^|]+) \|", README, flags=re.MULTILINE))
    for name, field in Settings.model_fields.items():
        variable = f"MEDMO_{name.upper()}"
        assert variable in rows, f"{variable} is missing from the README's configuration table"
        if field.default is not None:
            default = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert rows[variable].strip().strip("`") == default.removesuffix(".0"), variable
    assert set(rows) == {f"MEDMO_{name.upper()}" for name in Settings.model_fields}


def test_ci_runs_the_readme_test_command() -> None:
    assert "```bash\nbash .ci/test\n```" in README
    assert "bash .ci/test" in CI_RUN


def section(title: str) -> str:
    start = README.index(f"### {title}")
    return README[start : README.index("\n### ", start + 1)]


def test_the_several_images_example_runs_against_a_live_server(
    live_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", section("Several images"), flags=re.DOTALL)
    study = cr_study(views=("PA", "LL"))
    (tmp_path / "pa.dcm").write_bytes(study.files[0])
    (tmp_path / "lateral.dcm").write_bytes(study.files[1])
    monkeypatch.chdir(tmp_path)
    code = example.replace("http://localhost:8000", live_server.url).replace("your-medmo-key", LIVE_API_KEY)
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    answer = scope["answer"]
    assert isinstance(answer, dict)
    assert [(image["index"], image["caption"]) for image in answer["images"]] == [
        (0, "frontal"),
        (1, "lateral"),
    ]
