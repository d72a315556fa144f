"""Importing this module registers every built-in task kind (one file each)."""

from moeguard.tasks.kinds import classification, language_modeling, summarization  # noqa: F401
