"""Task kinds: one object per kind (language modeling, classification, summarization, ...),
registered by name in :data:`KINDS`. See ``base.py`` for what a kind owns, and docs/tasks.md
("Adding a task kind") for how to add one.

This package's ``__init__`` imports only ``base``: the kind modules import the loaders, which
import the task definitions, which import this package.
"""

from moeguard.tasks.kinds.base import IGNORE, KINDS, Example, TaskKindSpec, get_kind, kind_names, register_kind

__all__ = ["IGNORE", "KINDS", "Example", "TaskKindSpec", "get_kind", "kind_names", "register_kind"]
