"""The tasks MedMO is asked to do, each declared once in its own module (`base.Task`).

Routes, the OpenAPI schema, /info, the settings (MEDMO_<NAME>_MAX_NEW_TOKENS) and the Structured Report
writer read this registry: a new task is a module and a line here.
"""

from __future__ import annotations

from typing import Any

from app.tasks.base import Task
from app.tasks.classify import CLASSIFY
from app.tasks.ground import GROUND
from app.tasks.report import REPORT
from app.tasks.vqa import VQA

TASKS: dict[str, Task[Any, Any]] = {task.name: task for task in (VQA, REPORT, GROUND, CLASSIFY)}
