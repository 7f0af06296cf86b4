"""The README is part of the product: its configuration table and commands must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

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
