"""Tasks: what a model is scored on (``base``), where records come from (``loaders``),
what differs per task kind (``kinds``), how text becomes tokens (``tokens``), how scores are
computed (``metrics``, ``evaluate``) and which tasks exist (``registry``).

The evaluation names are imported lazily: they pull in torch, which commands such as
``moeguard tasks list`` should not pay for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeguard.tasks.base import SourceSpec, Task, TaskKind
from moeguard.tasks.kinds import TaskKindSpec, get_kind, kind_names, register_kind
from moeguard.tasks.loaders import load_records
from moeguard.tasks.registry import get_task, list_tasks, load_task_file, register_task

if TYPE_CHECKING:
    from moeguard.tasks.evaluate import TaskResult, evaluate_suite, evaluate_task, loglikelihoods

_LAZY = {"TaskResult", "evaluate_suite", "evaluate_task", "loglikelihoods"}

__all__ = ["SourceSpec", "Task", "TaskKind", "TaskKindSpec", "TaskResult", "evaluate_suite", "evaluate_task",
           "get_kind", "get_task", "kind_names", "list_tasks", "load_records", "load_task_file", "loglikelihoods",
           "register_kind", "register_task"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from moeguard.tasks import evaluate

        return getattr(evaluate, name)
    raise AttributeError(f"module 'moeguard.tasks' has no attribute {name!r}")
